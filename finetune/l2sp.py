"""L2-SP, the pull toward the base: the gradient of `lam * ||theta - theta_base||^2` on the trained weights."""

from __future__ import annotations

import torch


class PullToBase:
    """L2-SP: the gradient of `lam * ||theta - theta_base||^2`, added after the data gradient is all-reduced (it is
    the same on every rank). With LoRA the update theta - theta_base is the adapter's own scale * B @ A, so no copy
    of the base is kept; full fine-tuning keeps one copy of the trained weights."""

    def __init__(self, model, lam: float):
        from peft.tuners.lora import LoraLayer

        self.lam = lam
        self.adapters = [(m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name])
                         for m in model.modules() if isinstance(m, LoraLayer) for name in m.lora_A]
        self.params = [p for p in model.parameters() if p.requires_grad] if not self.adapters else []
        self.base = [p.detach().clone() for p in self.params]

    def apply(self) -> torch.Tensor:
        """Adds the penalty's gradient to .grad and returns the penalty."""
        with torch.enable_grad():
            if self.adapters:
                # ||s B A||_F^2 = s^2 * sum((B^T B) * (A A^T)): r x r products, never the full out x in update.
                penalty = sum(s * s * ((b.T @ b) * (a @ a.T)).sum() for a, b, s in self.adapters)
                params = [w for a, b, _ in self.adapters for w in (a, b)]
            else:
                penalty = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.base))
                params = self.params
            grads = torch.autograd.grad(self.lam * penalty, params)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)
        return self.lam * penalty.detach()
