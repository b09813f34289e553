"""What an evaluation measured, as plain records: one model's scores per task, its drift from the base, and one
measurement of a run. They round-trip through JSON by their own fields (`to_dict` / `from_dict`), so a field added
here is saved and read back everywhere (report.json, curve.jsonl, the base-result cache). Beside them, what
both the evaluation and the reader of lm-eval's logs need to read lm-eval's samples alike. No torch here."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

# Metrics whose per-example scores are 0 or 1, as the paired statistics need (forgetting.py), in the order a task's
# headline metric is picked among them.
SUPPORTED_METRICS = ("acc", "acc_norm", "exact_match")
PROMPT_CHARS = 400  # of each example's question kept for the report (the end, where the question is)


def chosen_option(choices: list[str], lls: list[float], gold, metric: str) -> tuple[str, str]:
    """(the option a multiple-choice model picked, as lm-eval scores `metric`, and the right option) from each
    option's log-likelihood; `gold` is the right option's index (a list: its first) or the answer itself."""
    if metric == "acc_norm":  # lm-eval's normalisation: the log-likelihood per character of the option
        lls = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    pick = max(range(len(lls)), key=lambda i: lls[i]) if lls else None
    gold = gold[0] if isinstance(gold, list) else gold
    expected = choices[gold] if isinstance(gold, int) and 0 <= gold < len(choices) else str(gold)
    return (choices[pick] if pick is not None else ""), expected


@dataclass
class TaskScore:
    task: str  # lm-eval's name for it (a task's or a group's)
    metric: str  # the headline metric (see evaluate.headline_metric)
    value: float  # lm-eval's aggregate (for a group of tasks: the mean over all their examples)
    examples: dict[str, float]  # per-example score by "task/doc_id", in document order
    others: dict[str, dict[str, float]] = field(default_factory=dict)  # other metrics' per-example scores
    chance: float | None = None  # the mean score of guessing (multiple choice: 1 / options); None for generation
    available: int | None = None  # examples the task has; fewer are scored under eval.limit
    answers: dict[str, str] = field(default_factory=dict)  # per example: the chosen option or the extracted reply
    prompts: dict[str, str] = field(default_factory=dict)  # per example: the question (no few-shot, no template)
    expected: dict[str, str] = field(default_factory=dict)  # per example: the right answer
    # leaf task -> what lm-eval's --log_samples writes of it (results, config, per-example samples), JSON-safe, so a
    # report can save it in lm-eval's own layout; empty where not kept (the curve file leaves it out)
    log: dict[str, dict] = field(default_factory=dict)


@dataclass
class Drift:
    kl: float  # mean per-token KL(P_base || P_tuned) in nats; exactly 0 for identical weights
    ci95: list[float]  # bootstrap interval of kl over the texts (resampled texts, seeded)
    ppl_base: float  # perplexity of the base model on the drift texts
    ppl_tuned: float
    ppl_ratio: float  # ppl_tuned / ppl_base; above 1 = the tuned model finds the text less likely
    tokens: int  # predicted tokens the means are over
    texts: int  # texts they come from


@dataclass
class Evaluation:
    """One model measured at one point of a run."""

    step: int | None  # optimizer updates the model had; 0 = the base model; None = a saved model, not counted
    tasks: dict[str, TaskScore]  # original tasks, by the name the recipe gives
    targets: dict[str, TaskScore] = field(default_factory=dict)  # tasks of the new skill
    drift: dict[str, Drift] = field(default_factory=dict)  # from the base, by kind ("chat", "text"); none for the base


def to_dict(record) -> dict:
    return dataclasses.asdict(record)


def from_dict(cls, data: dict):
    """A record from its JSON form, built by the dataclass's own fields and types (nested records included); a
    field missing from older JSON takes its default."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _typed(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})


def _typed(tp, value):
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _typed(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is dict:
        return {k: _typed(args[1], v) for k, v in value.items()}
    if origin is list:
        return [_typed(args[0], v) for v in value]
    return value
