"""The parallel engine a run uses (one process, DDP, FSDP or DeepSpeed): set up here, and the one place that knows
which it is. The rest of the code asks what the engine can do (`sharded`, `clips_inside`), never its name."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

from .errors import UpstreamChanged, UserError


class EngineError(UserError):
    """A launch that cannot run finetune as configured; the message says what to change."""


@dataclass(frozen=True)
class Engine:
    name: str  # accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...

    @property
    def sharded(self) -> bool:
        """No single process holds all the weights (FSDP, DeepSpeed): whole-model work goes through saved files."""
        return self.name in ("FSDP", "DEEPSPEED")

    @property
    def clips_inside(self) -> bool:
        """The engine clips gradients and skips non-finite updates itself, and reports no gradient norm."""
        return self.name == "DEEPSPEED"

    @property
    def updates_in_backward(self) -> bool:
        """accelerate steps the engine inside backward(), before anything added after it (a regularizer's gradient)
        can reach the update."""
        return self.name == "DEEPSPEED"

    @property
    def partitions_at_load(self) -> bool:
        """transformers builds every model it loads partitioned over the ranks (ZeRO-3's zero.Init): a collective."""
        return self.name == "DEEPSPEED"


def engine(accelerator: Accelerator) -> Engine:
    return Engine(accelerator.distributed_type.name)


def make_accelerator(recipe, project_dir: str) -> Accelerator:
    """The Accelerator for a recipe, after checking that the launch really set up what it asked for."""
    accelerator = Accelerator(
        # Without CUDA, accelerate only picks gloo DDP for launched ranks when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=recipe.train.grad_accum, sync_with_dataloader=False
        ),
        # The same permutation on every rank and in every run with this seed: resume and rank counts agree.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        log_with=recipe.train.trackers or None,
        project_dir=project_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise EngineError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes}: "
                          "each would train its own model. Launch with a config whose distributed_type matches "
                          "this machine (e.g. launch/cpu_ddp.yaml without GPUs).")
    # On CPU accelerate quietly turns FSDP and DeepSpeed launches into plain DDP; say so rather than train
    # with a memory layout the user did not ask for.
    name = engine(accelerator).name
    for wanted in asked_for():
        if name != wanted:
            raise EngineError(_unsupported(wanted, name))
    return accelerator


def asked_for() -> list[str]:
    """The sharded engines the launch config asks for ("FSDP", "DEEPSPEED"), from accelerate's environment: known
    before the Accelerator exists, and whether or not accelerate can set them up here."""
    flags = (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
    return [wanted for wanted, flag in flags if os.environ.get(flag, "false").lower() == "true"]


def _unsupported(wanted: str, name: str) -> str:
    return (f"the launch config asks for {wanted}, but accelerate set up {name} (it supports {wanted} only on GPUs). "
            "On CPU use launch/cpu_ddp.yaml.")


def check_launch() -> None:
    """Before anything loads: an FSDP or DeepSpeed launch on a machine without an accelerator is refused at once,
    not after every process has set itself up (what make_accelerator would find out later)."""
    from accelerate.state import PartialState

    # A process state already set up as a GPU launch leaves it (the tests' CPU workers relabel theirs: DEEPSPEED, or
    # MULTI_GPU, which AcceleratorState then turns into FSDP) is taken as it is.
    shared = getattr(PartialState, "_shared_state", None)
    if not isinstance(shared, dict):
        raise UpstreamChanged("accelerate", "PartialState._shared_state")
    ready = getattr(shared.get("distributed_type"), "name", None)
    if not torch.accelerator.is_available():
        for wanted in asked_for():
            if ready not in (wanted, "MULTI_GPU" if wanted == "FSDP" else wanted):
                raise EngineError(_unsupported(wanted, "MULTI_CPU" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                                               else "NO"))


# ---------------------------------------------------------------- saving a run's state, as each engine can


def _adapter_engine(accelerator) -> str | None:
    """"FSDP" or "DEEPSPEED" when a LoRA model is sharded by that engine: accelerate's save_state would then write the
    frozen base model into every checkpoint (its adapter-only hooks get no weights to trim under these engines)."""
    from accelerate.utils import is_peft_model

    running = engine(accelerator)
    if running.sharded and any(is_peft_model(accelerator.unwrap_model(m)) for m in _prepared(accelerator)[0]):
        return running.name
    return None


def _prepared(accelerator) -> tuple[list, list]:
    """The models and optimizers accelerator.prepare registered: accelerate keeps them in private lists, which
    save_state reads (tests/test_contracts.py pins that)."""
    if not (isinstance(getattr(accelerator, "_models", None), list)
            and isinstance(getattr(accelerator, "_optimizers", None), list)):
        raise UpstreamChanged("accelerate", "Accelerator._models and ._optimizers")
    return accelerator._models, accelerator._optimizers


@contextmanager
def _models_saved_apart(accelerator):
    """save_state/load_state without the models and optimizers, which the caller saves or loads itself."""
    models, optimizers = _prepared(accelerator)
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield zip(models, optimizers)
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def save_state(accelerator, folder: Path) -> None:
    """accelerate's save_state, adapter only for a LoRA run under FSDP or DeepSpeed. Under FSDP, save_state writes the
    whole sharded model (a tiny Llama: 752 KB against 68 KB; an 8B model: ~16 GB a checkpoint), so the models and
    optimizers go through accelerate's FSDP functions with adapter_only, as transformers' Trainer saves them;
    DeepSpeed's engine leaves frozen weights out itself when asked."""
    engine = _adapter_engine(accelerator)
    if engine == "FSDP":
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        with _models_saved_apart(accelerator) as pairs:
            for i, (model, optimizer) in enumerate(pairs):
                save_fsdp_model(plugin, accelerator, model, str(folder), i, adapter_only=True)
                save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder), i)
            accelerator.save_state(str(folder))
    elif engine == "DEEPSPEED":
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
    else:
        accelerator.save_state(str(folder))


def load_state(accelerator, folder: Path) -> None:
    engine = _adapter_engine(accelerator)
    if engine == "FSDP":
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        with _models_saved_apart(accelerator) as pairs:
            for i, (model, optimizer) in enumerate(pairs):
                load_fsdp_model(plugin, accelerator, model, str(folder), i, adapter_only=True)
                load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder), i)
            accelerator.load_state(str(folder))
    elif engine == "DEEPSPEED":
        accelerator.load_state(str(folder), load_module_strict=False)  # the frozen weights are not in the checkpoint
    else:
        accelerator.load_state(str(folder))
