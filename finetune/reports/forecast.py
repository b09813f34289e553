"""A forecast of a run's final forgetting from its first probes (finetune/probes.py): for each original task, the
final change of its score, with a prediction interval, and the verdict the final evaluation would then give.

The model is ordinary least squares, one per task, of the measured final change on the logarithms of the two KL
probes at the last probe within the first `share` of updates (RL's Razor: forgetting grows with the KL from the
base; the first reply tokens are where a fine-tune overwrites the answer format). It is fitted on earlier runs of
the same model and tasks (a calibration file), never on the run it forecasts. The prediction interval is the
textbook one for a new observation, t-quantile times the residual scale times sqrt(1 + leverage); it says nothing
about runs unlike the calibration runs (another model, other tasks, far other settings).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist, median

FEATURES = ("probe_kl_general", "probe_kl_task")
FLOOR = 1e-4  # KL below this reads as this: log(0) is no feature
BEYOND_DOUBT = 0.95  # odds at or above which a forecast verdict is acted on (eval.on_over_budget: stop)


def features(probes: dict[int, dict], max_steps: int, share: float = 0.1) -> tuple[int, list[float]] | None:
    """(the probe step used, [1, log KL general, log KL task]) from the last probe within the first `share` of the
    updates, or None when there is none with both KLs."""
    early = [s for s, p in probes.items() if int(s) <= share * max_steps and all(k in p for k in FEATURES)]
    if not early:
        return None
    step = max(early, key=int)
    return int(step), [1.0, *(math.log(max(probes[step][k], FLOOR)) for k in FEATURES)]


def half_width(n: int) -> float:
    """About the half-width of the report's paired 95% interval for a change near 0 with a few percent of examples
    flipping each way: how the final verdict's interval is sized by a task's n."""
    return 1.96 * math.sqrt(0.1 / n)


def read_calibration(path: Path, share: float = 0.1) -> list[dict]:
    """The runs of a calibration file (bench/forecast_calibration.py) a forecast can be fitted on: those whose first
    updates reproduced and that have a probe within the first `share` of their updates, each with its features."""
    rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    used = []
    for r in rows:
        f = features(r["probes"], r["max_steps"], share) if r.get("reproduced") else None
        if f is not None:
            used.append({**r, "step": f[0], "x": f[1]})
    return used


def forecast_run(calibration: list[dict], probes: dict, max_steps: int, max_drop: float, share: float = 0.1,
                 sizes: dict[str, int] | None = None) -> dict | None:
    """A run's forecast from its probes so far (step -> probe values) and the calibration runs: per original task
    (those every calibration run measured) the final change with its 95% prediction interval, the odds of each final
    verdict, the most likely one and whether it is beyond doubt. `sizes`: each task's number of examples where known
    (a finished run's, in the validation); else the calibration runs' median. None without a probe in the first
    `share` of updates or too few calibration runs to fit."""
    f = features(probes, max_steps, share)
    if f is None or not calibration:
        return None
    step, x = f
    tasks = sorted(set.intersection(*(set(r["tasks"]) for r in calibration)))
    changes, forecasts, widths = {}, {}, {}
    for task in tasks:
        model = fit([r["x"] for r in calibration], [r["tasks"][task]["delta"] for r in calibration])
        if model is None:
            return None
        point, lo, hi = model.predict(x)
        changes[task] = {"change": point, "pi95": [lo, hi]}
        forecasts[task] = (point, model.predictive(x)[1], model.dof)
        n = sizes[task] if sizes else int(median(r["tasks"][task]["n"] for r in calibration))
        widths[task] = half_width(n)
    odds = verdict_odds(forecasts, widths, max_drop)
    likely = max(odds, key=odds.get)
    return {"step": step, "max_steps": max_steps, "runs": len(calibration), "tasks": changes, "odds": odds,
            "verdict": likely, "beyond_doubt": odds[likely] >= BEYOND_DOUBT}


def change_text(change: dict) -> str:
    """One task's forecast change and its prediction interval, as the progress line and the report show it."""
    return f"{change['change']:+.3f} [{change['pi95'][0]:+.3f}, {change['pi95'][1]:+.3f}]"


def odds_text(forecast: dict) -> str:
    return ", ".join(f"{v} {forecast['odds'][v]:.2f}" for v in ("PASS", "INCONCLUSIVE", "FAIL"))


def describe(forecast: dict) -> str:
    """One line for the progress output."""
    tasks = "; ".join(f"{t} {change_text(c)}" for t, c in forecast["tasks"].items())
    sure = "beyond doubt" if forecast["beyond_doubt"] else f"not beyond doubt (odds under {BEYOND_DOUBT})"
    return (f"forecast after update {forecast['step']} of {forecast['max_steps']} (from {forecast['runs']} calibration "
            f"runs): final change {tasks}; verdict odds {odds_text(forecast)}: {forecast['verdict']}, {sure}")


@dataclass
class Fit:
    """One task's least-squares fit: coefficients, (X'X)^-1, residual scale and degrees of freedom."""

    beta: list[float]
    inverse: list[list[float]]
    scale: float
    dof: int

    def predictive(self, x: list[float]) -> tuple[float, float]:
        """(point, scale) of the forecast for a new run at x: its change is point + scale * t(dof)."""
        point = sum(b * v for b, v in zip(self.beta, x))
        leverage = sum(x[i] * self.inverse[i][j] * x[j] for i in range(len(x)) for j in range(len(x)))
        return point, self.scale * math.sqrt(1 + leverage)

    def predict(self, x: list[float], level: float = 0.95) -> tuple[float, float, float]:
        point, scale = self.predictive(x)
        half = t_quantile(0.5 + level / 2, self.dof) * scale
        # A change of a score lies in [-1, 1], as the report's intervals do; a wider band says no more.
        return min(1.0, max(-1.0, point)), max(-1.0, point - half), min(1.0, point + half)


def fit(xs: list[list[float]], ys: list[float]) -> Fit | None:
    """Least squares of ys on xs (rows with a leading 1), or None with too few rows to estimate a residual scale."""
    p, n = len(xs[0]), len(xs)
    if n <= p + 1:
        return None
    xtx = [[sum(x[i] * x[j] for x in xs) for j in range(p)] for i in range(p)]
    inverse = _inverse(xtx)
    if inverse is None:
        return None
    xty = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(p)]
    beta = [sum(inverse[i][j] * xty[j] for j in range(p)) for i in range(p)]
    residuals = [y - sum(b * v for b, v in zip(beta, x)) for x, y in zip(xs, ys)]
    scale = math.sqrt(sum(r * r for r in residuals) / (n - p))
    return Fit(beta, inverse, scale, n - p)


def verdict(predicted: dict[str, float], half_widths: dict[str, float], max_drop: float) -> str:
    """The verdict the final evaluation would give if each task's change were as forecast, with the interval
    half-width its number of examples gives: PASS when every task's interval lies above -max_drop, FAIL when one lies
    wholly below it, else INCONCLUSIVE."""
    if any(d + half_widths[t] < -max_drop for t, d in predicted.items()):
        return "FAIL"
    if all(d - half_widths[t] > -max_drop for t, d in predicted.items()):
        return "PASS"
    return "INCONCLUSIVE"


def verdict_odds(forecasts: dict[str, tuple[float, float, int]], half_widths: dict[str, float],
                 max_drop: float) -> dict[str, float]:
    """How likely each final verdict is, given each task's forecast (point, scale, dof: its change is point +
    scale * t(dof)) and the half-width of its final interval. A task ends FAIL when its change is below
    -max_drop - half-width, PASS when above -max_drop + half-width; tasks are taken as independent. A verdict is
    forecast "beyond doubt" only at odds of 0.95 or more: a point forecast past the budget with a wide interval is
    not a FAIL."""
    all_pass, none_fail = 1.0, 1.0
    for task, (point, scale, dof) in forecasts.items():
        w = half_widths[task]
        fail = t_cdf((-max_drop - w - point) / scale, dof)
        passing = 1.0 - t_cdf((-max_drop + w - point) / scale, dof)
        all_pass *= passing
        none_fail *= 1.0 - fail
    return {"PASS": all_pass, "FAIL": 1.0 - none_fail, "INCONCLUSIVE": max(0.0, none_fail - all_pass)}


def t_cdf(x: float, dof: int) -> float:
    """Student's t distribution function, by bisection on t_quantile (no scipy: reports run without it)."""
    lo, hi = 1e-9, 1.0 - 1e-9
    if x <= t_quantile(lo, dof):
        return 0.0
    if x >= t_quantile(hi, dof):
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if t_quantile(mid, dof) < x:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(q: float, dof: int) -> float:
    """Student's t quantile (Hill's 1970 approximation through the normal quantile; within 1e-3 for dof >= 3)."""
    z = NormalDist().inv_cdf(q)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3 + g4 / dof ** 4


def _inverse(m: list[list[float]]) -> list[list[float]] | None:
    """Gauss-Jordan inverse of a small matrix, or None when it is singular."""
    n = len(m)
    a = [row[:] + [float(i == j) for j in range(n)] for i, row in enumerate(m)]
    for c in range(n):
        pivot = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[pivot][c]) < 1e-12:
            return None
        a[c], a[pivot] = a[pivot], a[c]
        a[c] = [v / a[c][c] for v in a[c]]
        for r in range(n):
            if r != c:
                a[r] = [v - a[r][c] * w for v, w in zip(a[r], a[c])]
    return [row[n:] for row in a]
