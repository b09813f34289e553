"""L2-SP, the pull toward the base: the gradient of `lam * sum(F * (theta - theta_base)^2)` on the trained weights,
with F = 1 (L2-SP) or the base model's diagonal Fisher on original-task data (EWC, Kirkpatrick et al. 2017)."""

from __future__ import annotations

import random

import torch
from torch.distributed.tensor import DTensor

from ..data import IGNORE, Collator, DataStats, encode_weighted
from ..errors import UserError
from ..loss import token_loss_sum
from ..model import lora_layers


class L2SPError(UserError):
    """An L2-SP or EWC setting this run cannot honour."""


def label(recipe) -> str | None:
    if not recipe.train.l2sp:
        return None
    return f"{'EWC' if recipe.train.l2sp_fisher else 'L2-SP'} {recipe.train.l2sp:g}"


def regularizer(recipe, ctx) -> PullToBase | None:
    """The pull toward the base, with the base model's Fisher measured first when `train.l2sp_fisher` asks (EWC)."""
    tr = recipe.train
    if not tr.l2sp:
        return None
    if ctx.engine.updates_in_backward:
        # The penalty's gradient is added after backward(), which has already stepped this engine: the logged
        # penalty would be that of the updated weights, and its gradient would reach the optimizer only if the engine
        # happened to carry .grad into the next update (ZeRO-2 on CPU did; nothing promises it).
        raise L2SPError("`train.l2sp` is not supported under DeepSpeed, which takes its optimizer step inside "
                        "backward(), before the pull's gradient is added; use FSDP (launch/fsdp.yaml), DDP or one "
                        "process, or set `train.l2sp: 0`.")
    fisher = None
    if tr.l2sp_fisher is not None:
        if ctx.engine.sharded:
            raise L2SPError(f"`train.l2sp_fisher` is not supported under {ctx.engine.name} (the Fisher pass needs "
                            "whole weights); use it with DDP or one process, or set `train.l2sp_fisher: null`.")
        ctx.accelerator.print(f"measuring the base model's Fisher on {tr.l2sp_fisher.rows} examples (EWC)")
        with ctx.accelerator.main_process_first():  # tokenized once, like the training data; the rest read the cache
            batches = fisher_batches(tr.l2sp_fisher, recipe.data, ctx.tokenizer, tr.seed, ctx.accelerator.device)
        fisher = diagonal_fisher(ctx.model, batches, token_loss_sum)
    return PullToBase(ctx.model, tr.l2sp, fisher)


class PullToBase:
    """Added after the data gradient is all-reduced (it is the same on every rank). With LoRA the update
    theta - theta_base is the adapter's own scale * B @ A, so no copy of the base is kept; full fine-tuning keeps
    one copy of the trained weights. `fisher`, if given, holds one weight per element of what is pulled: per adapted
    layer its base weight's shape (LoRA), or per trained parameter its shape (full); see `diagonal_fisher`."""

    name = "l2sp"

    def __init__(self, model, lam: float, fisher: list[torch.Tensor] | None = None):
        self.lam = lam
        self.adapters = lora_adapters(model)
        self.params = [p for p in model.parameters() if p.requires_grad] if not self.adapters else []
        self.base = [p.detach().clone() for p in self.params]
        self.fisher = fisher

    def apply(self) -> torch.Tensor:
        """Adds the penalty's gradient to .grad and returns the penalty."""
        with torch.enable_grad():
            if self.adapters:
                params = [w for a, b, _, _ in self.adapters for w in (a, b)]
                if self.fisher is None:
                    # ||s B A||_F^2 = s^2 * sum((B^T B) * (A A^T)): r x r products, never the full out x in update.
                    penalty = sum(s * s * ((b.T @ b) * (a @ a.T)).sum() for a, b, s, _ in self.adapters)
                else:  # the weighting is per element of the update, so the update is formed, one layer at a time
                    penalty = sum(s * s * (f * (b @ a) ** 2).sum() for (a, b, s, _), f in zip(self.adapters, self.fisher))
            else:
                params = self.params
                weights = self.fisher or [None] * len(params)
                penalty = sum(((p - p0) ** 2 if f is None else f * (p - p0) ** 2).sum()
                              for p, p0, f in zip(params, self.base, weights))
            grads = torch.autograd.grad(self.lam * penalty, params)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)
        penalty = self.lam * penalty.detach()
        # Under FSDP the weights are DTensor shards and the sum is this rank's part of it (a tiny Llama: 0.0295 logged
        # against 0.0590); the gradient above is right either way. Collective: every rank applies the pull.
        return penalty.full_tensor() if isinstance(penalty, DTensor) else penalty


def lora_adapters(model) -> list[tuple]:
    """(A weight, B weight, scale, frozen base weight) for every LoRA layer and adapter; [] without LoRA."""
    return [(m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name], m.get_base_layer().weight)
            for m, name in lora_layers(model)]


def diagonal_fisher(model, batches, loss_sum) -> list[torch.Tensor]:
    """The base model's diagonal empirical Fisher for every weight PullToBase pulls: the mean over `batches` (one
    example each) of the squared gradient of that example's mean target-token loss. For LoRA these are the frozen
    base weights under the adapters, which need a gradient for this pass only (at LoRA's start B = 0, so the model
    is the base). Scaled to mean 1 over all weights, so that `l2sp` means the same strength with or without it."""
    adapters = lora_adapters(model)
    weights = [w for *_, w in adapters] if adapters else [p for p in model.parameters() if p.requires_grad]
    trainable = [w.requires_grad for w in weights]
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model itself, not of a random sub-network
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        n = 0
        for batch in batches:
            targets = (batch["labels"] != IGNORE).sum()
            if not targets:
                continue
            grads = torch.autograd.grad(loss_sum(model, dict(batch)) / targets, weights, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.float() ** 2
            n += 1
    finally:
        for w, t in zip(weights, trainable):
            w.requires_grad_(t)
        model.train(was_training)
    if not n:
        raise L2SPError("no example of `train.l2sp_fisher.datasets` has a target token to measure the Fisher on; "
                        "check the data's format and `data.max_length`.")
    mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
    return [f / mean for f in fisher]


def fisher_batches(section, data, tokenizer, seed: int, device) -> list[dict]:
    """`section.rows` examples of the Fisher data (drawn with the run's seed), one per batch, ready for the model."""
    examples = encode_weighted(section.datasets, tokenizer, data, DataStats(), seed)
    picked = random.Random(seed).sample(range(len(examples)), min(section.rows, len(examples)))
    collate = Collator(tokenizer.pad_token_id, "padding")
    batches = []
    for i in picked:
        batch = collate([[(examples[i]["input_ids"], examples[i]["target"])]])
        batch.pop("n_tokens")
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches
