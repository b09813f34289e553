"""WiSE-FT at the end of training (`lora.wise_ft_alpha`): after the last update the adapter's update is scaled by
alpha, so final/ and the forgetting report are the model at theta_base + alpha * (theta_tuned - theta_base)
(Wortsman et al. 2022). It costs no evaluation of its own, where `finetune interpolate` (wise_ft.py) measures several
alphas after a run to choose one. The checkpoints keep the unscaled adapter, so a resumed run scales once."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..model import lora_layers


class WiseFTError(UserError):
    """A run that cannot scale its adapter at the end as asked."""


def label(recipe) -> str | None:
    lora = recipe.lora
    return f"WiSE-FT alpha {lora.wise_ft_alpha:g}" if lora is not None and lora.wise_ft_alpha < 1 else None


def at_end(recipe, ctx):
    """The scaling to apply after the last update, checked at set-up: a setting the run cannot honour is refused
    before it trains."""
    if label(recipe) is None:
        return None
    if ctx.engine.partitions_at_load:
        raise WiseFTError("`lora.wise_ft_alpha` is not supported under DeepSpeed, whose partitioned weights cannot be "
                          "scaled in place; train with FSDP (launch/fsdp.yaml), DDP or one process, or set "
                          "`lora.wise_ft_alpha: 1` and run `finetune interpolate RUN --alphas A --pick` after it.")
    alpha = recipe.lora.wise_ft_alpha
    ctx.accelerator.print(f"WiSE-FT: after the last update the adapter's update is scaled by {alpha:g} "
                          "(lora.wise_ft_alpha); final/ and the report are that model")
    return lambda: scale_adapter(ctx.model, alpha)


def scale_adapter(model, alpha: float) -> None:
    """Multiply every LoRA update B @ A by alpha through B: a standard adapter that peft loads as it is. On every
    rank alike (a shard of B under FSDP is scaled where it lies)."""
    with torch.no_grad():
        for layer, name in lora_layers(model):
            layer.lora_B[name].weight.mul_(alpha)
