"""Started by `accelerate launch` in the FSDP2 and DeepSpeed tests, never by finetune: runs `finetune train` under
Accelerate's real sharded engines on CPU, over gloo.

Accelerate takes its FSDP and DeepSpeed branches only on GPU-like devices: on CPU a launch with an FSDP or DeepSpeed
config comes up as MULTI_CPU (plain DDP), which finetune refuses. Before finetune builds its Accelerator, this worker
relabels the process state as a GPU launch would leave it (MULTI_GPU for FSDP, so AcceleratorState takes its FSDP
branch; DEEPSPEED with `cpu=False` for DeepSpeed, whose own CPU accelerator then stands in for CUDA). finetune's
entry point then runs unchanged, and the worker checks, as soon as the model is prepared, that the engine really is
the one the config asks for (DTensor parameters under FSDP2; a DeepSpeed engine at the config's ZeRO stage), so an
Accelerate upgrade that changes these branches fails here instead of quietly testing DDP.

    accelerate launch --config_file CONFIG tests/engine_worker.py RECIPE [overrides...]

FINETUNE_TEST_KILL_AFTER_SAVE=N: every rank SIGKILLs itself right after its part of the Nth checkpoint write, before
the checkpoint is complete (every rank's shard files are on disk; nothing is renamed into place), as when a node
goes down. (Killing one rank alone makes torchrun wait 30 s for the other, stuck in a collective, before killing it.)
"""

import logging
import os
import signal
import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

# What each rank evaluated (finetune/sharing.py's debug lines), for the tests to check that the ranks shared the work.
logging.getLogger("finetune.measure.sharing").setLevel(logging.DEBUG)
logging.getLogger("finetune.measure.sharing").addHandler(logging.StreamHandler(sys.stdout))

FSDP = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"

state = PartialState(cpu=True)
if state.distributed_type != DistributedType.MULTI_CPU or FSDP == DEEPSPEED:
    sys.exit(f"engine_worker: expected a 2-process CPU launch with an FSDP or a DeepSpeed config, got "
             f"{state.distributed_type} (FSDP {FSDP}, DeepSpeed {DEEPSPEED})")
if FSDP:
    state.distributed_type = DistributedType.MULTI_GPU
else:
    import deepspeed.comm.torch  # noqa: F401 (the package's `torch` attribute is PyTorch itself: see sys.modules)

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (C++) on first use: 4 minutes on this busy
    # 2-core machine, once per machine. gloo alone carries the collectives, as NCCL does on GPUs.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    state.distributed_type = DistributedType.DEEPSPEED
    build = Accelerator.__init__

    def build_for_deepspeed(self, *args, **kwargs):
        # AcceleratorState takes its DeepSpeed branch only when not told to run on CPU.
        build(self, *args, **{**kwargs, "cpu": False})

    Accelerator.__init__ = build_for_deepspeed

prepare = Accelerator.prepare


def prepare_and_check(self, model, *args, **kwargs):
    prepared = prepare(self, model, *args, **kwargs)
    engine = prepared[0]
    if FSDP:
        from torch.distributed.tensor import DTensor

        version = getattr(self.state.fsdp_plugin, "fsdp_version", None)
        sharded = all(isinstance(p, DTensor) for p in engine.parameters())
        seen = f"{self.distributed_type.name} fsdp_version={version} all parameters DTensor={sharded}"
        ok = self.distributed_type == DistributedType.FSDP and version == 2 and sharded
    else:
        from deepspeed import DeepSpeedEngine

        wanted = self.state.deepspeed_plugin.zero_stage
        stage = engine.zero_optimization_stage() if isinstance(engine, DeepSpeedEngine) else None
        # Under ZeRO-3 every parameter is partitioned: each rank holds an empty placeholder and its ds_tensor share.
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.parameters())
        seen = f"{self.distributed_type.name} zero_stage={stage} parameters partitioned={partitioned}"
        ok = (self.distributed_type == DistributedType.DEEPSPEED and stage == wanted
              and partitioned == (wanted == 3))
    self.print(f"engine-check: {seen}")
    if not ok:
        raise SystemExit(f"engine_worker: accelerate did not set up the engine the config asks for: {seen}")
    return prepared


Accelerator.prepare = prepare_and_check

kill_after = int(os.environ.get("FINETUNE_TEST_KILL_AFTER_SAVE", "0"))
if kill_after:
    save_state, saves = Accelerator.save_state, []

    def save_state_then_die(self, *args, **kwargs):
        result = save_state(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state_then_die

from finetune.cli import main  # noqa: E402  (after the relabelling, as finetune would be imported on a GPU node)

sys.exit(main(["train", *sys.argv[1:]]))
