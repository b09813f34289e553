"""Whole weights out of a model that FSDP or DeepSpeed shards over ranks, for what needs them on one process: the
forgetting evaluation during training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .engine import engine
from .model import load_model
from .recipe import LoraSection, ModelSection


@contextmanager
def whole_model(accelerator, model, model_section: ModelSection, lora: LoraSection | None) -> Iterator:
    """Collective. Yields, on the main process, a model that holds all the current weights (None on the others): the
    unwrapped model itself, or under FSDP/DeepSpeed a copy built from model.path with the gathered weights loaded, on
    the main process's device (one more copy of the model there while it lives). Models loaded inside, e.g. the base
    for the drift, are whole ones too."""
    if not engine(accelerator).sharded:
        yield accelerator.unwrap_model(model) if accelerator.is_main_process else None
        return
    state = accelerator.get_state_dict(model)  # every rank takes part; the main process gets the whole
    if not accelerator.is_main_process:
        yield None
        return
    with _without_zero3_init(accelerator):
        copy = load_model(model_section, lora)
        copy.load_state_dict(state)
        del state
        yield copy.to(accelerator.device)


@contextmanager
def _without_zero3_init(accelerator) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3 transformers builds every model it loads partitioned over the ranks (zero.Init), a
    collective: the main process, loading a model the other ranks never load, would wait for them forever (seen on 2
    CPU ranks). accelerate's zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 flag on, so the
    flag itself is lifted here, and set again as accelerate sets it."""
    if not engine(accelerator).partitions_at_load:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
