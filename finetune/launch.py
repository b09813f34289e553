"""`finetune launch [accelerate launch options] COMMAND [ARGS]`: accelerate's own launcher, run in this process, so that
a launch that cannot work is refused before any rank starts (an FSDP or DeepSpeed config on a machine without GPUs:
seconds, not every rank importing torch first), and a launch that fails ends in one line and the ranks' exit status.

Under `accelerate launch ... -m finetune` the ranks are the same, but a failed rank makes the launcher re-raise torch
elastic's ChildFailedError: a traceback of the launcher's own code and a summary box per rank, below finetune's line.
accelerate has no switch for that (its --debug swallows the error and exits 0), hence this wrapper."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys

from .errors import UpstreamChanged, UserError

USAGE = """usage: finetune launch [accelerate launch options] COMMAND [ARGS]

Start a finetune COMMAND (train, eval, ...) on the processes an accelerate config asks for, as
`accelerate launch [options] -m finetune COMMAND [ARGS]` would, with two differences: a launch that cannot work here
(FSDP or DeepSpeed without GPUs, a recipe with a mistake) is refused before any process starts, and a failed launch
ends with the ranks' one error line and exit status, without the launcher's traceback.

The options are accelerate launch's (see `accelerate launch --help`), e.g. --config_file launch/fsdp.yaml,
--num_processes 4, --machine_rank 1 --main_process_ip HOST.

examples:
  finetune launch --config_file launch/cpu_ddp.yaml train recipes/tiny-lora.yaml
  finetune launch --config_file launch/fsdp.yaml train recipes/qwen2.5-7b-full-fsdp.yaml train.lr=1e-5
  finetune launch --config_file launch/multi_gpu_ddp.yaml --num_processes 4 train recipes/x.yaml
"""


# accelerate launch options that take no value: a command word right after one of them is the command, not its value.
_FLAGS = {"--cpu", "--multi_gpu", "--tpu", "--use_deepspeed", "--use_fsdp", "--use_megatron_lm", "--use_xpu", "-m",
          "--module", "--no_python", "--quiet", "-q", "--debug", "--same_network", "--standalone", "--tpu_cluster",
          "--no_tpu_cluster", "--downcast_bf16", "--dynamo_use_fullgraph", "--dynamo_use_dynamic",
          "--dynamo_use_regional_compilation", "--enable_cpu_affinity"}


def split(argv: list[str], commands: set[str]) -> tuple[list[str], list[str]]:
    """accelerate's options, then finetune's command and its arguments: the line splits at the first command word."""
    for i, word in enumerate(argv):
        if word in commands and not (i and argv[i - 1].startswith("--") and "=" not in argv[i - 1]
                                     and argv[i - 1] not in _FLAGS):
            return argv[:i], argv[i:]
    raise UserError("finetune launch needs a finetune command after accelerate's options, e.g. `finetune launch "
                    "--config_file launch/cpu_ddp.yaml train recipes/tiny-lora.yaml` (see finetune launch --help).")


def run(accelerate_args: list[str], finetune_args: list[str], verbose: bool) -> int:
    """Start the launch; the ranks' exit status (0 when all succeeded)."""
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = accelerate_launch.launch_command_parser().parse_args([*accelerate_args, "-m", "finetune", *finetune_args])
    for part in ("_validate_launch_command", "simple_launcher"):  # replaced below; tests/test_contracts.py pins both
        if not hasattr(accelerate_launch, part):
            raise UpstreamChanged("accelerate", f"accelerate.commands.launch.{part}")
    _check_before_start(accelerate_launch)
    accelerate_launch.simple_launcher = _one_process
    if not verbose:
        _quiet_elastic()
        # Its list of defaults used ("`--num_processes` was set to a value of `0`") when no config exists: said here
        # in one line instead (_check_before_start).
        accelerate_launch.logger.setLevel(logging.ERROR)
    try:
        accelerate_launch.launch_command(args)
    except ChildFailedError as failed:
        return _report(failed)
    except _Exited as exited:  # one process (_one_process): it printed its own lines
        return exited.status
    except ImportError as missing:  # accelerate's launcher for DeepSpeed, without deepspeed installed
        raise UserError(f"the launch needs a package that is not installed: {missing} (for DeepSpeed: "
                        "pip install -e \".[deepspeed]\" in finetune's checkout).") from missing
    except SignalException as stopped:  # Ctrl-C or the scheduler's SIGTERM: torch elastic passed it to the ranks
        return _status(-int(stopped.sigval))
    return 0


class _Exited(Exception):
    """The one process of a launch ended with a non-zero status, after printing its own lines."""

    def __init__(self, status: int):
        self.status = status


def _one_process(args) -> None:
    """accelerate's simple_launcher, without its handling of signals: since accelerate 1.16 a Ctrl-C makes it SIGTERM
    the process (a second signal, which finetune obeys at once) and SIGKILL it 5 s later, in the middle of the
    checkpoint the first signal asked for. Here the process decides: Ctrl-C reaches it from the terminal (same process
    group), SIGTERM sent to the launcher alone is passed on (as torchrun does for several), and the launcher waits for
    the process's checkpoint and last line, then returns its exit status."""
    try:
        from accelerate.utils.launch import prepare_simple_launcher_cmd_env
    except ImportError as e:
        raise UpstreamChanged("accelerate", "accelerate.utils.launch.prepare_simple_launcher_cmd_env") from e

    command, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(command, env=env)
    # Set after the process started, so that it inherits the default handlers, not these.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code != 0:
        raise _Exited(_status(code))


def _status(code: int) -> int:
    """A process's exit code as a shell reports it: a death by signal N (code -N) is 128 + N."""
    return code if code >= 0 else 128 - code


def _quiet_elastic() -> None:
    """torch elastic's own lines ("failed (exitcode: 2) local_rank: 1", "Received 15 death signal, shutting down
    workers"): the ranks say why. Its loggers set their own levels when created, so each is set once it exists."""
    import torch.distributed.run  # noqa: F401  (creates the launcher's and the agent's loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _check_before_start(accelerate_launch) -> None:
    """Look at the launch as accelerate resolved it (config file and options) before it starts the ranks. accelerate
    has no hook there, so its private _validate_launch_command is wrapped (tests/test_contracts.py pins it)."""
    validate = accelerate_launch._validate_launch_command

    def validated(args):
        try:
            resolved = validate(args)
        except Exception as e:  # a missing or malformed config file, options that contradict each other
            source = f"the launch config {args.config_file}" if args.config_file else "the launch options"
            reason = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"accelerate cannot use {source}: {reason}") from e
        launch, defaults = resolved[0], resolved[1]  # (args, config file's values, mixed precision's source)
        if defaults is None:  # no --config_file, and no default config from `accelerate config`
            print("note: no launch config (--config_file, or `accelerate config`'s default): accelerate's defaults, "
                  f"{launch.num_processes or 1} process(es) on this machine.", file=sys.stderr)
        wanted = ["FSDP"] * bool(launch.use_fsdp) + ["DeepSpeed"] * bool(launch.use_deepspeed)
        if wanted:
            import torch

            if not torch.accelerator.is_available():
                source = launch.config_file or "the launch"
                raise UserError(f"{source} asks for {wanted[0]}, which accelerate runs only on GPUs, and this machine "
                                "has none. On CPU use launch/cpu_ddp.yaml (data parallel over gloo).")
        return resolved

    accelerate_launch._validate_launch_command = validated


def _report(failed) -> int:
    """One line for what the ranks' own lines did not say already; the root cause's exit status."""
    said = {}
    for rank, failure in sorted(failed.failures.items()):
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        if message.startswith("error: "):  # finetune's error file: the message a rank's mistake printed
            said.setdefault(message, rank)
    rank, root = failed.get_first_failure()
    for message, first in said.items():
        if first != 0:  # rank 0 printed its own; a mistake met elsewhere only is named here
            print(f"error: rank {first}: {message[len('error: '):]}", file=sys.stderr)
    if not said:
        why = (f"was killed by signal {root.signal_name()}" if root.exitcode < 0
               else f"exited with code {root.exitcode}")
        print(f"error: the launch failed: rank {rank} {why} (its output above says why).", file=sys.stderr)
    return _status(root.exitcode)
