"""Forgetting in numbers: paired changes between base and tuned on the same examples, the budget verdict, the best
evaluated step, and the Pareto front of runs. Pure functions of scores; nothing here runs a model.

The 95% interval of a change is the paired normal approximation: delta +- 1.96 * sd(d) / sqrt(n), where d are
the per-example differences tuned - base over the n examples both models were scored on. Pairing removes the
between-example variance that two independent intervals would double count (Miller 2024, "Adding error bars
to evals"); with a hundred examples it is as good as a bootstrap and needs no seed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .records import Evaluation, TaskScore

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
CORRECT = 0.5  # a per-example score at or above this counts as right (scores are 0/1 for acc and exact_match)


@dataclass
class Change:
    metric: str
    base: float
    tuned: float
    delta: float  # tuned - base: negative = forgotten (original task) or unlearned (target task)
    ci95: list[float] | None  # paired 95% interval of delta; None below two paired examples
    n: int  # examples both models were scored on
    flips: dict[str, int]  # correct_to_wrong, wrong_to_correct
    significant: bool  # the interval excludes 0

    @property
    def half_width(self) -> float | None:
        return None if self.ci95 is None else (self.ci95[1] - self.ci95[0]) / 2


def paired_change(base: TaskScore, tuned: TaskScore) -> Change:
    """The change from base to tuned on one task, with its paired interval and the examples that flipped."""
    keys = [k for k in base.examples if k in tuned.examples]
    pairs = [(base.examples[k], tuned.examples[k]) for k in keys]
    delta = tuned.value - base.value
    ci = None
    if len(pairs) >= 2:
        half = Z95 * statistics.stdev(t - b for b, t in pairs) / math.sqrt(len(pairs))
        ci = [delta - half, delta + half]
    flips = {"correct_to_wrong": sum(b >= CORRECT > t for b, t in pairs),
             "wrong_to_correct": sum(t >= CORRECT > b for b, t in pairs)}
    return Change(metric=base.metric, base=base.value, tuned=tuned.value, delta=delta, ci95=ci, n=len(pairs),
                  flips=flips, significant=ci is not None and (ci[0] > 0 or ci[1] < 0))


def largest_drop(base: dict[str, TaskScore], tuned: dict[str, TaskScore]) -> tuple[str, float] | None:
    """(task, base - tuned) for the task that lost most; None without tasks. A gain is a negative drop."""
    drops = [(name, base[name].value - tuned[name].value) for name in base]
    return max(drops, key=lambda d: d[1]) if drops else None


def within_budget(base: dict[str, TaskScore], tuned: dict[str, TaskScore], max_drop: float) -> bool:
    """No original task dropped by more than `max_drop` (point estimates; the report shows the intervals)."""
    worst = largest_drop(base, tuned)
    # A drop equal to the budget passes; the tolerance absorbs float rounding in base - tuned.
    return worst is None or worst[1] <= max_drop + 1e-12


def mean_gain(base: dict[str, TaskScore], tuned: dict[str, TaskScore]) -> float:
    """Mean change over the target tasks; 0.0 without target tasks."""
    return sum(tuned[n].value - base[n].value for n in base) / len(base) if base else 0.0


def choose_best(base: Evaluation, curve: list[Evaluation], max_drop: float) -> Evaluation | None:
    """The evaluated step within budget that gained most on the target tasks (the latest among equals, so without
    target tasks the latest within budget); None when every step is over budget. The base is never chosen."""
    fits = [e for e in curve if e.step and within_budget(base.tasks, e.tasks, max_drop)]
    return max(fits, key=lambda e: (mean_gain(base.targets, e.targets), e.step), default=None)


def mean_change(changes: list[Change]) -> tuple[float, float | None]:
    """(mean delta, half-width of its 95% interval) over tasks, the tasks' examples taken as independent."""
    mean = sum(c.delta for c in changes) / len(changes)
    if any(c.half_width is None for c in changes):
        return mean, None
    return mean, math.sqrt(sum(c.half_width ** 2 for c in changes)) / len(changes)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (drop, gain) points no other point beats: none has less or equal drop and more or equal
    gain while being strictly better in one. Equal points are both on the front."""

    def beats(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]
