"""The parallel engine a run uses (one process, DDP, FSDP or DeepSpeed): set up here, and the one place that knows
which it is. The rest of the code asks what the engine can do (`sharded`, `clips_inside`), never its name."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

from .errors import UserError


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
    for wanted in _asked_for():
        if name != wanted:
            raise EngineError(_unsupported(wanted, name))
    return accelerator


def _asked_for() -> list[str]:
    flags = (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
    return [wanted for wanted, flag in flags if os.environ.get(flag, "false").lower() == "true"]


def _unsupported(wanted: str, name: str) -> str:
    return (f"the launch config asks for {wanted}, but accelerate set up {name} (it supports {wanted} only on GPUs). "
            "On CPU use launch/cpu_ddp.yaml.")


def check_launch() -> None:
    """Before anything loads: an FSDP or DeepSpeed launch on a machine without an accelerator is refused at once,
    not after every process has set itself up (what make_accelerator would find out later)."""
    if not torch.accelerator.is_available():
        for wanted in _asked_for():
            raise EngineError(_unsupported(wanted, "MULTI_CPU" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else
                                           "NO"))
