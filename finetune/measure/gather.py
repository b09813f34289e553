"""Whole weights out of a model that FSDP or DeepSpeed shards over ranks, for what needs them whole: the forgetting
evaluation during training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..engine import engine
from ..model import load_model
from ..recipe import LoraSection, ModelSection


@contextmanager
def whole_model(accelerator, model, model_section: ModelSection, lora: LoraSection | None) -> Iterator:
    """Collective. Yields, on every rank, a model that holds all the current weights: the unwrapped model itself, or
    under FSDP/DeepSpeed a copy built from model.path, on the rank's device (one more copy of the model there while
    it lives), into which the main process loads the gathered weights and sends them to the other ranks. Models
    loaded inside, e.g. the base for the drift, are whole ones too, and under ZeRO-3 generate() inside does not keep
    the ranks in step (transformers' synced_gpus follows the flag lifted here), so each generates for its own share.

    A whole copy per rank, rather than the sharded model: every forward pass of a sharded model is a collective,
    so the ranks would have to run the same number of them, which lm-eval's batching does not promise (2 ranks
    sharing a 4-choice task under lm-eval's own padding: 12 and 9 forward passes at batch size 1). One gather per
    evaluation also moves the weights once, where sharded forward passes move them again for every batch."""
    if not engine(accelerator).sharded:
        yield accelerator.unwrap_model(model)
        return
    import torch.distributed as dist

    state = accelerator.get_state_dict(model)  # every rank takes part; the main process gets the whole
    with _without_zero3_init(accelerator):
        copy = load_model(model_section, lora)
        if accelerator.is_main_process:
            copy.load_state_dict(state)
        del state
        copy = copy.to(accelerator.device)
        for tensor in copy.state_dict().values():  # the same keys, in the same order, on every rank
            dist.broadcast(tensor, src=0)
        yield copy


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
