"""Library output a finetune user cannot act on, silenced where it comes from; `finetune --verbose` keeps all of it.

What a normal run would otherwise print, where it comes from, and the switch used:
  "Loading weights", "Writing model shards"    transformers' progress bars     its progress-bar switch
  transformers' advice, FutureWarnings         transformers logging, warnings  its verbosity; FutureWarning filter
  "Generating train split"                     datasets' progress bars         datasets' switch (finetune's own
                                                                               tokenizing bar shows for large data)
  "<task>: Custom kwargs can be passed ..."    lm-eval's loggers, per task     the lm_eval logger's level
  unlabelled "10/10" bars, "Tokenizing inputs" lm-eval building requests       its modules' tqdm, disabled
  "fatal: not a git repository"                lm-eval runs `git describe`     the same call, stderr dropped
  "Converting and de-quantizing GGUF tensors"  transformers' GGUF loader's tqdm  that module's tqdm, disabled
                                                                               (finetune says it converts, once)
  "Setting accelerator to CPU ..."             DeepSpeed, imported by every    a filter on its logger, set before
                                               accelerate unwrap_model when    it is imported (its own set-up resets
                                               installed                       the level, not the filter)
Downloads keep their bars (they can take minutes), and so do lm-eval's labelled request bars on a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import warnings

_quiet = False  # set by the CLI; library users (and tests in-process) see the libraries as they are


def configure(verbose: bool) -> None:
    """The CLI's choice: quiet unless --verbose (or FINETUNE_VERBOSE=1). Imports nothing."""
    global _quiet
    _quiet = not (verbose or os.environ.get("FINETUNE_VERBOSE", "") not in ("", "0"))


def libraries() -> None:
    """Called by a command just before it imports the heavy libraries (importing them costs seconds, so not before
    the cheap checks that may end the command)."""
    if not _quiet:
        return
    # Library deprecations speak to finetune's code, not to its user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.msg)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # datasets costs a second to import, which `finetune check` does not need: the modules that import it call
    # datasets_library() then.
    if "datasets" in sys.modules:
        datasets_library()


def datasets_library() -> None:
    """datasets' logging and progress bars off when the CLI asked for quiet; for each module of finetune's that
    imports datasets (or lm-eval, which does) to call right after."""
    if not _quiet:
        return
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@contextlib.contextmanager
def progress_bars(show: bool):
    """datasets' progress bars on for one call of finetune's own (tokenizing a large dataset) when they were
    switched off above; otherwise as they are."""
    if not (_quiet and show):
        yield
        return
    import datasets

    datasets.enable_progress_bars()
    try:
        yield
    finally:
        datasets.disable_progress_bars()


def _git_hash_silently() -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _tqdm_off(*args, **kwargs):
    """A library's module-level `tqdm`, replaced: the bar is never drawn (callers pass disable=False themselves,
    so it is forced here)."""
    from tqdm.auto import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


def silence_gguf_conversion() -> None:
    """transformers' GGUF loader's own tqdm bar (not under its progress-bar switch), for model_files.py to call
    before converting (a no-op unless the CLI asked)."""
    if not _quiet:
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.tqdm = _tqdm_off


def silence_lm_eval() -> None:
    """lm-eval's own chatter, for evaluate.py to call after importing lm_eval (a no-op unless the CLI asked)."""
    if not _quiet:
        return
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm_eval.api.task.tqdm = _tqdm_off  # "100%| 10/10": building each task's requests, unlabelled
    lm_eval.api.model.tqdm = _tqdm_off  # "Tokenizing inputs"
    if not sys.stderr.isatty():  # in a log file a bar is one long line of carriage returns
        lm_eval.models.huggingface.tqdm = _tqdm_off
    lm_eval.evaluator.get_git_commit_hash = _git_hash_silently
    datasets_library()
