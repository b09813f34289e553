"""Forgetting in numbers: paired changes between base and tuned on the same examples, the budget verdict, the best
evaluated step, comparisons of runs and the Pareto front. Pure functions of per-example scores; no model runs here.

Every per-example score is 0 or 1 (acc, acc_norm, exact_match). On one task, what changed is the pairs' 2x2 table,
and only its off-diagonal counts move the score: `worse` examples went right -> wrong, `better` wrong -> right.

- The change, delta = (better - worse) / n, gets Tango's score interval for a paired difference of proportions
  (Tango 1998; recommended by Fagerland, Lydersen & Laake 2014): the differences its score test does not reject. It
  stays inside [-1, 1], keeps a width when no example changed (+-z^2 / (n + z^2)), and holds its coverage at the
  small n of evaluation suites, where the normal approximation on the differences gives [0, 0] for an unchanged
  model and can leave [-1, 1]. A bootstrap would also collapse to [0, 0] when nothing changed, hence the score
  interval.
- Significance is the exact McNemar test (two-sided binomial test on the flips), Holm-adjusted across a run's
  tasks: the approximate interval may exclude 0 on four flips to none, the exact test (p = 0.125) does not.
- The verdict is a non-inferiority decision against the budget `max_drop`. PASS when every task's 95% interval lies
  above -max_drop (an intersection-union test, which keeps its 5% level without adjustment); FAIL when some task's
  simultaneous interval (Bonferroni, level 1 - 0.05/m over m tasks) lies wholly below it; otherwise INCONCLUSIVE,
  with the number of examples that would decide it at the observed rates of change.
- Means over tasks (the learning-forgetting plane) combine the tasks' intervals as independent by MOVER (Zou &
  Donner 2008): asymmetric intervals stay asymmetric.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from statistics import NormalDist

from .records import Evaluation, TaskScore

ALPHA = 0.05
CORRECT = 0.5  # a per-example score at or above this counts as right (scores are 0 or 1)


def z_value(level: float) -> float:
    """The two-sided standard normal quantile of a confidence level (0.95 -> 1.96)."""
    return NormalDist().inv_cdf(0.5 + level / 2)


# ---------------------------------------------------------------- one task


def paired_interval(worse: float, better: float, n: float, level: float = 1 - ALPHA) -> list[float]:
    """Tango's score interval for delta = (better - worse) / n, the change of a paired proportion. Counts may be
    fractional (used to ask what n would decide a verdict at the observed rates). [-1, 1] without examples."""
    if n <= 0:
        return [-1.0, 1.0]
    z = z_value(level)

    # In Tango's notation the estimate is (n12 - n21) / n; with n12 = worse and n21 = better that is the drop, so the
    # drop's interval is found and negated at the end. p21 is the constrained maximum-likelihood estimate of the
    # probability of `better` given the hypothesised drop d.
    def score(d: float) -> float:
        a, b, c = 2 * n, -worse - better + (2 * n - worse + better) * d, -better * d * (1 - d)
        p21 = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
        variance = n * (2 * p21 + d * (1 - d))
        if variance <= 0:
            return math.copysign(math.inf, worse - better - n * d) if worse - better - n * d else 0.0
        return (worse - better - n * d) / math.sqrt(variance)

    def root(target: float, lo: float, hi: float) -> float:
        # score() falls as d rises: bisect to the d where it crosses `target`.
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if score(mid) > target else (lo, mid)
        return (lo + hi) / 2

    drop = (worse - better) / n
    low = -1.0 if score(-1.0) <= z else root(z, -1.0, drop)
    high = 1.0 if score(1.0) >= -z else root(-z, drop, 1.0)
    return [-high, -low]


def mcnemar_p(worse: int, better: int) -> float:
    """Exact two-sided McNemar p-value: under no change each flip goes either way with probability 1/2."""
    flips = worse + better
    if flips == 0:
        return 1.0
    tail = sum(math.comb(flips, k) for k in range(min(worse, better) + 1))
    return min(1.0, 2 * tail / 2**flips)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (the family-wise error stays at the level)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_drop(n: int, tests: int = 1) -> float | None:
    """The smallest drop n examples can show at all: k right -> wrong flips and none the other way, with k the
    fewest that the exact McNemar test, Holm-adjusted over `tests` tasks, finds significant. None when even all n
    flipping would not be."""
    k = 1
    while k <= n and mcnemar_p(k, 0) * tests >= ALPHA:
        k += 1
    return k / n if k <= n else None


@dataclass
class Change:
    """Base -> tuned on one task's paired examples."""

    metric: str
    base: float  # mean score over the paired examples
    tuned: float
    delta: float  # tuned - base: negative = forgotten (original task) or unlearned (target task)
    ci95: list[float]  # Tango's 95% interval of delta, inside [-1, 1]
    n: int  # examples both models were scored on
    flips: dict[str, int]  # correct_to_wrong, wrong_to_correct
    p_value: float  # exact McNemar, two-sided
    p_holm: float = 1.0  # p_value adjusted over the run's tasks of this kind (original or target)
    significant: bool = False  # p_holm < 0.05
    ci_simultaneous: list[float] = field(default_factory=lambda: [-1.0, 1.0])  # Bonferroni over those tasks
    detectable_drop: float | None = None  # the smallest drop this n can show (see detectable_drop)
    chance: float | None = None  # the score of guessing (multiple choice); None for generation

    @property
    def worse(self) -> int:
        return self.flips["correct_to_wrong"]

    @property
    def better(self) -> int:
        return self.flips["wrong_to_correct"]


def paired_change(base: TaskScore, tuned: TaskScore, metric: str | None = None) -> Change:
    """The change from base to tuned on one task, on the examples both were scored on; `metric` picks one of the
    task's other metrics instead of its headline one."""
    before = base.examples if metric in (None, base.metric) else base.others[metric]
    after = tuned.examples if metric in (None, tuned.metric) else tuned.others[metric]
    pairs = [(before[k] >= CORRECT, after[k] >= CORRECT) for k in before if k in after]
    n = len(pairs)
    worse, better = sum(b and not t for b, t in pairs), sum(t and not b for b, t in pairs)
    return Change(metric=metric or base.metric, base=sum(b for b, _ in pairs) / n if n else math.nan,
                  tuned=sum(t for _, t in pairs) / n if n else math.nan, delta=(better - worse) / n if n else 0.0,
                  ci95=paired_interval(worse, better, n), n=n,
                  flips={"correct_to_wrong": worse, "wrong_to_correct": better}, p_value=mcnemar_p(worse, better),
                  detectable_drop=detectable_drop(n), chance=base.chance)


def changes(base: dict[str, TaskScore], tuned: dict[str, TaskScore]) -> dict[str, Change]:
    """Every task's change, with the multiplicity of testing them together accounted for: Holm-adjusted p-values,
    Bonferroni simultaneous intervals, and the smallest drop each n can show among that many tasks."""
    out = {name: paired_change(base[name], tuned[name]) for name in base}
    m = len(out)
    for c, p in zip(out.values(), holm([c.p_value for c in out.values()])):
        c.p_holm, c.significant = p, p < ALPHA
        c.ci_simultaneous = paired_interval(c.worse, c.better, c.n, 1 - ALPHA / m)
        c.detectable_drop = detectable_drop(c.n, m)
    return out


# ---------------------------------------------------------------- the verdict


PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


def task_status(c: Change, max_drop: float) -> str:
    # A drop equal to the budget is within it; the tolerance absorbs float rounding in the interval's limit.
    if c.ci95[0] >= -max_drop - 1e-12:
        return PASS
    if c.ci_simultaneous[1] < -max_drop:
        return FAIL
    return INCONCLUSIVE


def examples_to_decide(c: Change, max_drop: float, tasks: int = 1) -> int | None:
    """Roughly how many examples would decide an INCONCLUSIVE task, if its flips kept their observed rates: the
    smallest n whose interval clears -max_drop on the side the change lies. None when the change sits on the
    budget's edge (no number of examples decides it) or more than ten million would be needed."""
    if c.n == 0 or c.delta == -max_drop:
        return None
    rate_worse, rate_better = c.worse / c.n, c.better / c.n
    if c.delta > -max_drop:
        def decided(n: int) -> bool:
            return paired_interval(rate_worse * n, rate_better * n, n)[0] >= -max_drop
    else:
        def decided(n: int) -> bool:
            return paired_interval(rate_worse * n, rate_better * n, n, 1 - ALPHA / tasks)[1] < -max_drop
    high = max(c.n, 1)
    while not decided(high):
        high *= 2
        if high > 10**7:
            return None
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if decided(mid) else (mid, high)
    return high


def verdict(changes_: dict[str, Change], names: dict[str, str], max_drop: float, limited: bool = False,
            settings: tuple[str, str] = ("eval.max_drop", "eval.limit")) -> dict:
    """The forgetting verdict over the original tasks' changes (`names`: their display names). A dict for
    report.json: status, text, within_budget (status is PASS), the task that dropped most, and per undecided task
    the examples that would decide it. `settings`: what the text calls the budget and the limit on examples."""
    if not changes_:
        return {"status": "NO TASKS", "within_budget": True, "max_drop": max_drop, "largest_drop": None,
                "undecided": [], "text": "No original tasks were evaluated (eval.tasks is empty): only the drift "
                                         "measures forgetting."}
    status = {spec: task_status(c, max_drop) for spec, c in changes_.items()}
    worst = min(changes_, key=lambda s: changes_[s].delta)
    undecided = [{"task": names[s], "examples_needed": examples_to_decide(changes_[s], max_drop, len(changes_)),
                  "n": changes_[s].n} for s in changes_ if status[s] == INCONCLUSIVE]
    fails = [s for s in changes_ if status[s] == FAIL]
    budget = f"the budget of {max_drop:.3f} ({settings[0]})"
    if fails:
        overall = FAIL
        listed = ", ".join(f"{names[s]} ({_delta_with_ci(changes_[s])})" for s in fails)
        text = f"FAIL: dropped by more than {budget}, beyond doubt at this n: {listed}."
    elif undecided:
        overall = INCONCLUSIVE
        parts = []
        for u, s in zip(undecided, [s for s in changes_ if status[s] == INCONCLUSIVE]):
            need = u["examples_needed"]
            how = (f"about {need:,} examples would decide it" if need else
                   "no number of examples decides it: the change sits on the budget's edge")
            parts.append(f"{names[s]} ({_delta_with_ci(changes_[s])}, n={changes_[s].n}: {how})")
        text = (f"INCONCLUSIVE: the interval of {'; '.join(parts)} straddles -{max_drop:.3f}, {budget}. "
                "Neither within nor over the budget can be claimed.")
        if limited:
            text += f" Evaluation was limited ({settings[1]}): all of each task's examples would narrow the intervals."
    else:
        overall = PASS
        text = (f"PASS: every original task's 95% interval lies above -{max_drop:.3f} ({budget}); the largest "
                f"drop is {names[worst]} ({_delta_with_ci(changes_[worst])}).")
    return {"status": overall, "within_budget": overall == PASS, "max_drop": max_drop, "setting": settings[0],
            "text": text,
            "largest_drop": {"task": names[worst], "drop": -changes_[worst].delta}, "undecided": undecided,
            "tasks": {names[s]: status[s] for s in changes_}}


def _delta_with_ci(c: Change) -> str:
    return f"{c.delta:+.3f} [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}]"


def budget_status(base: dict[str, TaskScore], tuned: dict[str, TaskScore], max_drop: float) -> str:
    """PASS, FAIL or INCONCLUSIVE over every original task, as the verdict decides it."""
    found = changes(base, tuned)
    statuses = {task_status(c, max_drop) for c in found.values()}
    return FAIL if FAIL in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses else PASS


def within_budget(base: dict[str, TaskScore], tuned: dict[str, TaskScore], max_drop: float) -> bool:
    """PASS: every original task's interval lies above -max_drop."""
    return budget_status(base, tuned, max_drop) == PASS


def mean_gain(base: dict[str, TaskScore], tuned: dict[str, TaskScore]) -> float:
    """Mean change over the target tasks; 0.0 without target tasks."""
    return sum(tuned[n].value - base[n].value for n in base) / len(base) if base else 0.0


def choose_best(base: Evaluation, curve: list[Evaluation], max_drop: float) -> Evaluation | None:
    """The evaluated step that PASSes the budget and gained most on the target tasks (the latest among equals, so
    without target tasks the latest that passes); None when no step passes. The base is never chosen."""
    fits = [e for e in curve if e.step and within_budget(base.tasks, e.tasks, max_drop)]
    return max(fits, key=lambda e: (mean_gain(base.targets, e.targets), e.step), default=None)


# ---------------------------------------------------------------- across tasks and runs


def mean_interval(estimates: list[tuple[float, list[float]]]) -> tuple[float, list[float]]:
    """(mean, interval) of several independent estimates, each (value, [low, high]), by MOVER: the mean's margins
    are the root sum of squares of the estimates' own margins on each side, over their number."""
    m = len(estimates)
    mean = sum(v for v, _ in estimates) / m
    low = math.sqrt(sum((v - ci[0]) ** 2 for v, ci in estimates)) / m
    high = math.sqrt(sum((ci[1] - v) ** 2 for v, ci in estimates)) / m
    return mean, [mean - low, mean + high]


def run_difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict | None:
    """Run a minus run b on the same examples: per task the paired change from b's per-example scores to a's
    (`a[task][example]`), then the mean over the tasks both have. None when they share no task."""
    shared = [t for t in a if t in b]
    if not shared:
        return None
    per_task = {}
    for t in shared:
        keys = [k for k in a[t] if k in b[t]]
        better = sum(a[t][k] >= CORRECT > b[t][k] for k in keys)
        worse = sum(b[t][k] >= CORRECT > a[t][k] for k in keys)
        per_task[t] = ((better - worse) / len(keys) if keys else 0.0, paired_interval(worse, better, len(keys)))
    mean, ci = mean_interval(list(per_task.values()))
    return {"mean": mean, "ci95": ci, "tasks": {t: {"delta": d, "ci95": c} for t, (d, c) in per_task.items()}}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (drop, gain) points no other point beats: none has less or equal drop and more or equal
    gain while being strictly better in one. Equal points are both on the front."""

    def beats(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


def bootstrap_ratio(numerators: list[float], denominators: list[float], *, reps: int = 2000, seed: int = 0) \
        -> list[float]:
    """95% percentile-bootstrap interval of sum(numerators) / sum(denominators), resampling the items (e.g. a drift's
    texts: per-text KL sums over per-text token counts) with replacement. Seeded, so a report is reproducible."""
    rng = random.Random(seed)
    items = list(zip(numerators, denominators))
    ratios = []
    for _ in range(reps):
        draw = rng.choices(items, k=len(items))
        total = sum(d for _, d in draw)
        ratios.append(sum(x for x, _ in draw) / total if total else 0.0)
    ratios.sort()
    return [ratios[int(0.025 * reps)], ratios[int(0.975 * reps) - 1]]
