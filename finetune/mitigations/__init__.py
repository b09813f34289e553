"""Ways to forget less, behind one small interface. Each module of this package is one mitigation, and the package
finds its modules itself: a new mitigation is its module, its recipe keys and its test, nothing else.

A module may define any of these (all optional):

    label(recipe) -> str | None
        How comparisons name a run that uses it ("replay 5%", "EWC 0.1"); None when the recipe does not use it.
    mix(recipe, train, tokenizer, stats) -> Dataset | None
        Data side: encoded examples to add to the training set (replay); bad rows counted in `stats`.
    regularizer(recipe, ctx) -> Regularizer | None
        A penalty on every update. Built before a checkpoint is loaded, while the weights are still the base's.
    at_end(recipe, ctx) -> Callable[[], None] | None
        A change to the model after the last update, before final/ is saved and measured (wise_ft_end). Built at
        set-up, so that a setting the run cannot honour is refused before it trains.

Post-hoc methods are commands of their own (wise_ft.py: `finetune interpolate`), listed in POST_HOC so that training
never imports them, and label the reports they write.
The budget policy (`eval.on_over_budget`) lives with evaluation during training (training_eval.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Regularizer(Protocol):
    name: str  # the key its penalty is logged under in metrics.jsonl

    def apply(self) -> torch.Tensor:
        """Called once per update, after the data gradient is all-reduced (the same on every rank) and before
        clipping: adds the penalty's gradient to each parameter's .grad, identically on every rank, and returns
        the value of the whole penalty (not one rank's share)."""


@dataclass
class Context:
    """What a regularizer may need to set itself up."""

    accelerator: Any
    engine: Any  # engine.Engine: what the parallel engine can do
    model: torch.nn.Module  # unwrapped: the model's own modules and parameters
    tokenizer: Any


# Commands of their own, run on a finished run: training never imports them (wise_ft.py needs evaluation and reports).
POST_HOC = {"wise_ft"}


def _modules() -> list:
    """The mitigations a training run may use: every module of this package but the post-hoc ones."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__)
                   if not m.name.startswith("_") and m.name not in POST_HOC)
    return [importlib.import_module(f"{__name__}.{name}") for name in found]


def method_kind(recipe) -> str:
    """The method a run trains with, as reports, model cards and `finetune check` name it: "QLoRA r=16" (LoRA on a
    quantized base), "LoRA r=16" or "full"."""
    if recipe.lora is None:
        return "full"
    return f"{'QLoRA' if recipe.model.quantization else 'LoRA'} r={recipe.lora.r}"


def describe(recipe) -> dict:
    """How reports name and group a run: `family` is the method and every mitigation it uses (runs of one family
    differ only in learning rate or seed, and a comparison draws them as one curve, in `order`, each point tagged
    `tag`); `label` adds the rate."""
    kind = method_kind(recipe)
    extras = [text for m in _modules() if hasattr(m, "label") and (text := m.label(recipe))]
    if any(spec.system for spec in recipe.data.train):
        extras.insert(0, "system prompt")  # the new data tied to a prompt of its own (data.train[].system)
    if recipe.lora is not None and recipe.lora.first_layer:
        extras.insert(0, f"layers {recipe.lora.first_layer} up")  # the lower layers frozen (lora.first_layer)
    return {"label": ", ".join([kind, f"lr {recipe.train.lr:g}", *extras]), "family": ", ".join([kind, *extras]),
            "lr": recipe.train.lr, "seed": recipe.train.seed, "tag": f"{recipe.train.lr:g}", "order": recipe.train.lr}


def method_label(recipe) -> str:
    """What comparisons call a run: the method, the learning rate and every mitigation it uses."""
    return describe(recipe)["label"]


def mix(recipe, train, tokenizer, stats):
    """The training examples with every data-side mitigation's examples added, and `stats` counting them."""
    from datasets import concatenate_datasets

    from ..data import count_tokens

    for module in _modules():
        extra = module.mix(recipe, train, tokenizer, stats) if hasattr(module, "mix") else None
        if extra is not None and len(extra):
            stats.mixed_examples += len(extra)
            stats.mixed_tokens += sum(len(t) for t in extra["input_ids"])
            stats.mixed_by.append(module.__name__.rsplit(".", 1)[-1])
            train = concatenate_datasets([train, extra])
    count_tokens(train, stats)
    return train


def regularizers(recipe, ctx: Context) -> list[Regularizer]:
    built = [m.regularizer(recipe, ctx) for m in _modules() if hasattr(m, "regularizer")]
    return [r for r in built if r is not None]


def at_end(recipe, ctx: Context) -> list:
    built = [m.at_end(recipe, ctx) for m in _modules() if hasattr(m, "at_end")]
    return [f for f in built if f is not None]
