"""A forecast of a run's final forgetting from its first probes (finetune/probes.py): for each original task, the
final change of its score, with a prediction interval, and the verdict the final evaluation would then give.

Each task's change is fitted by ordinary least squares on the logarithms of the two KL probes at the run's probe
(RL's Razor: forgetting grows with the KL from the base; the first reply tokens are where a fine-tune overwrites the
answer format), on earlier runs of the same model and tasks probed at the same share of their updates (a
calibration file), never on the run it forecasts. What the forecast is uncertain of is taken from those runs, not
from a normal curve: each calibration run adds its own leave-one-out error to the forecast (jackknife+, Barber et
al. 2021), all tasks of a run together, so the few runs that collapse give the forecast the heavy tail the changes
have, and a run that loses on every task counts once. The interval is the draws' conformal quantiles; the verdict
odds are the share of draws that give each final verdict.

The probes are used only where they forecast the calibration runs' own verdicts better (leave-one-out, by Brier
score) than the runs' spread alone, by more than that comparison's standard error; else the forecast is that
spread, and says so. On the demo model's 47 runs the probes of update 4 of 60 never do: a run's fate is decided
after its first tenth there; by update 16 they carry most of it (bench/forecast/validation_later.md). Nothing is
said beyond doubt about runs unlike the calibration runs: probes beyond every calibration run's are flagged, and
another model, other tasks or far other settings need their own calibration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import yaml

from ..files import read_jsonl

FEATURES = ("probe_kl_general", "probe_kl_task")
FLOOR = 1e-4  # KL below this reads as this: log(0) is no feature
BEYOND_DOUBT = 0.95  # odds at or above which a forecast verdict is acted on (eval.on_over_budget: stop)
LEVEL = 0.9  # of the prediction interval: a 95% one needs 39 calibration runs to be finite, 90% 19
VERDICTS = ("PASS", "INCONCLUSIVE", "FAIL")
FEWEST = 5  # calibration runs a forecast needs: leaving one out, then another, leaves 3 to fit the spread's mean


def features(probes: dict[int, dict], max_steps: int, share: float = 0.1,
             exact: bool = False) -> tuple[int, list[float]] | None:
    """(the probe step used, [1, log KL general, log KL task]) from the last probe within the first `share` of the
    updates, or None when there is none with both KLs; `exact`: only a probe at that share itself (a later forecast
    compares runs at the same point of their training, not one run's update 16 with another's update 4)."""
    within = share * max_steps + 1e-9  # 16/60 of 120 updates is update 32, whatever the float says
    early = [s for s, p in probes.items() if int(s) <= within and all(k in p for k in FEATURES)]
    if not early:
        return None
    step = max(early, key=int)
    if exact and int(step) < within - 2e-9:
        return None
    return int(step), [1.0, *(math.log(max(probes[step][k], FLOOR)) for k in FEATURES)]


def half_width(n: int) -> float:
    """About the half-width of the report's paired 95% interval for a change near 0 with a few percent of examples
    flipping each way: how the final verdict's interval is sized by a task's n."""
    return 1.96 * math.sqrt(0.1 / n)


def read_rows(path: Path) -> list[dict]:
    """The rows of a calibration file, as they are."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def calibration_at(rows: list[dict], share: float) -> list[dict]:
    """The rows of a calibration file a forecast after `share` of a run's updates is fitted on: those whose first
    updates reproduced and that were probed at that share of theirs, each with its features there."""
    used = []
    for r in rows:
        f = features(r["probes"], r["max_steps"], share, exact=True) if r.get("reproduced") else None
        if f is not None:
            used.append({**r, "step": f[0], "x": f[1]})
    return used


def calibration_row(run: Path) -> dict | None:
    """A finished run as a row of a calibration file: the probes its metrics.jsonl logged and what its report
    measured (bench/forecast_calibration.py makes the same rows for runs trained without probes, by training their
    first updates again). None for a run without a report or without probes, or one its forecast ended (pruned or
    stopped): it was measured where it stopped, not at its end."""
    run = Path(run)
    report_file = run / "forgetting" / "report.json"
    if not report_file.is_file():
        return None
    report = json.loads(report_file.read_text(encoding="utf-8"))
    logged = read_jsonl(run / "metrics.jsonl")
    probes = logged_probes(logged)
    if cut_short(report.get("forecast")) or not probes or not report.get("tasks"):
        return None
    saved = run / "recipe.yaml"
    recipe = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    max_steps = (recipe.get("train") or {}).get("max_steps") or max(m["step"] for m in logged)
    return {"run": str(run), "max_steps": max_steps, "reproduced": True, "probes": probes, **measured(report)}


def logged_probes(records: list[dict]) -> dict[str, dict[str, float]]:
    """update -> the probe values of the metrics.jsonl records that hold probes, as a calibration row keeps them."""
    return {str(m["step"]): {k: v for k, v in m.items() if k.startswith("probe_")} for m in records
            if "probe_kl_task" in m}


def measured(report: dict) -> dict:
    """What a calibration row keeps of a run's final report: its budget, verdict and each original task's change."""
    return {"max_drop": report["verdict"].get("max_drop"), "verdict": report["verdict"]["status"],
            "tasks": {t: {"delta": r["delta"], "ci95": r["ci95"], "n": r["n"]} for t, r in report["tasks"].items()}}


def forecast_run(calibration: list[dict], probes: dict, max_steps: int, max_drop: float, share: float = 0.1,
                 sizes: dict[str, int] | None = None) -> dict | None:
    """A run's forecast from its probes so far (step -> probe values) and the calibration runs: per original task
    (those every calibration run measured) the final change (the draws' median) with its prediction interval, the
    odds of each final verdict, the most likely one and whether it is beyond doubt, and whether the probes were used
    (`inputs`: "probes", or "none" where they forecast the calibration runs no better than their spread; `skill`:
    each one's leave-one-out Brier score there). `sizes`: each task's number of examples where known (a finished
    run's, in the validation); else the calibration runs' median. None without a probe in the first `share` of
    updates or with too few calibration runs to fit."""
    f = features(probes, max_steps, share)
    if f is None or not calibration:
        return None
    step, x = f
    tasks = sorted(set.intersection(*(set(r["tasks"]) for r in calibration)))
    scores = {inputs: brier(calibration, tasks, inputs) for inputs in ("none", "probes")}
    if scores["none"] is None:
        return None
    skill = {inputs: None if s is None else sum(s) / len(s) for inputs, s in scores.items()}
    gain = None if scores["probes"] is None else _paired_gain(scores["none"], scores["probes"])
    skill["gain_se"] = gain and gain[1]
    # The one-standard-error rule (Breiman et al. 1984): the probes only where they beat the spread by more than
    # the noise of that comparison. Picking the lower score alone took them on a hair's lead, at update 4 of 60 on
    # the demo model, where a low KL means a plain recipe at a low rate that fails and a high one a protected
    # recipe that holds, and they then forecast worse than the spread (bench/forecast/validation.md).
    inputs = "probes" if gain is not None and gain[0] > gain[1] else "none"
    drawn = draws(calibration, tasks, x, inputs)
    if sizes is None:
        sizes = {t: int(median(r["tasks"][t]["n"] for r in calibration)) for t in tasks}
    changes = {t: {"change": median(d[t] for d in drawn), "interval": interval([d[t] for d in drawn])}
               for t in tasks}
    chances = odds(drawn, {t: half_width(sizes[t]) for t in tasks}, max_drop)
    likely, sure = max(VERDICTS, key=chances.get), vouched(chances, len(drawn))
    far = inputs == "probes" and outside(calibration, x)
    return {"step": step, "max_steps": max_steps, "runs": len(calibration), "inputs": inputs, "skill": skill,
            "level": LEVEL, "tasks": changes, "odds": chances, "verdict": likely, "vouched": sure, "outside": far,
            "beyond_doubt": sure[likely] >= BEYOND_DOUBT and not far}


def outside(calibration: list[dict], x: list[float]) -> bool:
    """Whether the run's probes lie beyond every calibration run's: its leverage above the largest of theirs. There
    the fit extrapolates, and every fit without one run extrapolates alike, so the draws agree more than the runs
    can vouch for (on the demo model, plain LoRA at 5e-5 moved less by update 4 than any calibration run, and the
    fit on runs where less movement meant a plain recipe that failed forecast FAIL at 0.98; it ended INCONCLUSIVE)."""
    inverse = _gram_inverse([r["x"] for r in calibration])
    if inverse is None:
        return True
    return _product(inverse, x, x) > max(_product(inverse, r["x"], r["x"]) for r in calibration)


def row_forecast(run: dict, others: list[dict], step: int) -> dict | None:
    """The forecast a calibration row's run made after `step`, fitted on the other rows probed at the same share of
    their updates, with the run's own task sizes (bench/forecast_validate.py, forecast_pruning.py); None as
    forecast_run."""
    share = step / run["max_steps"]
    return forecast_run(calibration_at(others, share), run["probes"], run["max_steps"], run["max_drop"], share,
                        sizes={t: r["n"] for t, r in run["tasks"].items()})


def vouched(chances: dict[str, float], n: int) -> dict[str, float]:
    """The odds n draws can vouch for: the run forecast may be unlike every calibration run (its error ranks beyond
    all n with chance 1/(n+1), as the conformal interval's), so a share p of the draws stands for odds of at least
    p n/(n+1). Odds of 0.95 beyond doubt thus need 19 calibration runs that all agree; 4 that agree are not 1.0."""
    return {v: p * n / (n + 1) for v, p in chances.items()}


def change_text(change: dict) -> str:
    """One task's forecast change and its prediction interval, as the progress line and the report show it."""
    return f"{change['change']:+.3f} [{change['interval'][0]:+.3f}, {change['interval'][1]:+.3f}]"


def odds_text(forecast: dict) -> str:
    return ", ".join(f"{v} {forecast['odds'][v]:.2f}" for v in VERDICTS)


def inputs_text(forecast: dict) -> str:
    """What the forecast rests on, in a few words."""
    if forecast["inputs"] == "probes":
        return "the probes"
    if forecast["skill"]["probes"] is None:
        return "the calibration runs' spread alone: too few of them to fit the probes too"
    se = forecast["skill"].get("gain_se")
    margin = "" if se is None else f"; better by less than that comparison's standard error, {se:.2f}"
    return ("the calibration runs' spread alone: the probes forecast their verdicts no better (Brier "
            f"{forecast['skill']['probes']:.2f} against {forecast['skill']['none']:.2f}, leave-one-out{margin})")


def sure_text(forecast: dict) -> str:
    """Whether the most likely verdict is beyond doubt, and the odds that decide it, as the progress line and the
    report say it."""
    if forecast["beyond_doubt"]:
        return (f"beyond doubt ({forecast['vouched'][forecast['verdict']]:.2f}, as {forecast['runs']} calibration runs "
                "vouch for it)")
    return f"not beyond doubt ({doubt_text(forecast)})"


def doubt_text(forecast: dict) -> str:
    """Why a forecast verdict is not beyond doubt: its odds, too few calibration runs to vouch for them, or probes
    beyond every calibration run's."""
    if forecast.get("outside") and forecast["vouched"][forecast["verdict"]] >= BEYOND_DOUBT:
        return "the run's probes lie beyond every calibration run's, where the fit extrapolates"
    if forecast["odds"][forecast["verdict"]] >= BEYOND_DOUBT:
        n = forecast["runs"]
        return (f"{n} calibration runs vouch for odds up to {n / (n + 1):.2f}; "
                f"{BEYOND_DOUBT} needs {math.ceil(round(BEYOND_DOUBT / (1 - BEYOND_DOUBT), 9))}")
    return f"odds under {BEYOND_DOUBT}"


def first_text(forecast: dict) -> str:
    """What the first forecast (after 10% of the updates) said, where the report shows a later one."""
    first = forecast.get("first")
    if not first:
        return ""
    return (f" The first forecast, after update {first['step']}, said {first['verdict']} (verdict odds "
            f"{odds_text(first)}).")


def cut_short(forecast: dict | None) -> dict | None:
    """Where a run's forecast ended it: its sweep pruned it (finetune/pruning.py) or `eval.on_over_budget: stop`
    stopped it, {"step", "fail_odds", ...}; else None. Such a run was measured part-trained."""
    return (forecast or {}).get("pruned") or (forecast or {}).get("stopped")


def pruned_text(forecast: dict) -> str:
    """What a report says of a run its forecast ended (pruned by its sweep or stopped), else nothing."""
    cut = cut_short(forecast)
    if not cut:
        return ""
    how = (f"Pruned by its sweep here (study {cut['study']}, trial {cut['trial']}; " if forecast.get("pruned")
           else "Stopped here on this forecast (eval.on_over_budget: stop; ")
    return (f" {how}odds of FAIL {cut['fail_odds']:.2f}): it trained no further, so what was measured is the model "
            f"after update {cut['step']} of {forecast['max_steps']}, not a finished run's.")


def describe(forecast: dict) -> str:
    """One line for the progress output."""
    tasks = "; ".join(f"{t} {change_text(c)}" for t, c in forecast["tasks"].items())
    return (f"forecast after update {forecast['step']} of {forecast['max_steps']} (from {forecast['runs']} calibration "
            f"runs; {inputs_text(forecast)}): final change {tasks} ({forecast['level']:.0%} intervals); verdict odds "
            f"{odds_text(forecast)}: {forecast['verdict']}, {sure_text(forecast)}")


def draws(calibration: list[dict], tasks: list[str], x: list[float], inputs: str) -> list[dict[str, float]]:
    """One draw of the new run's final changes per calibration run j: the fit without run j, at x, plus run j's error
    under that fit (jackknife+), all tasks together. The fits without each run follow from the fit with all, by the
    leave-one-out identities of least squares (run j's error without it is e_j / (1 - h_j), its leverage h_j; leaving
    it out moves the fit at x by (x' (X'X)^-1 x_j) e_j / (1 - h_j)): one fit per task, not one per run, which keeps
    the forecast's leave-one-out choice of inputs (brier) quadratic in the runs. None where leaving a run out leaves
    too few to fit, or a run alone fixes a coefficient (h_j = 1)."""
    x, xs = _inputs(x, inputs), [_inputs(r["x"], inputs) for r in calibration]
    if len(xs) - 1 <= len(x) + 1:  # as fit() asks of the runs left
        return []
    inverse = _gram_inverse(xs)
    if inverse is None:
        return []
    # The leverages and the pulls toward x depend on the runs' inputs alone: the same for every task.
    levers = [_product(inverse, xj, xj) for xj in xs]
    toward = [_product(inverse, x, xj) for xj in xs]
    if any(1 - h < 1e-9 for h in levers):
        return []
    out: list[dict[str, float]] = [{} for _ in xs]
    for task in tasks:
        model = Fit.of(inverse, xs, [r["tasks"][task]["delta"] for r in calibration])
        at_x = model.at(x)
        for j, (xj, run) in enumerate(zip(xs, calibration)):
            error = (run["tasks"][task]["delta"] - model.at(xj)) / (1 - levers[j])
            out[j][task] = at_x + (1 - toward[j]) * error
    return out


def interval(values: list[float], level: float = LEVEL) -> list[float]:
    """The conformal prediction interval of `level` from n draws: the floor(a/2 (n+1))-th smallest to the
    ceil((1-a/2)(n+1))-th, a = 1 - level; a bound too few draws resolve is the end of the scale, -1 or 1."""
    v, n = sorted(values), len(values)
    lo, hi = math.floor((1 - level) / 2 * (n + 1)), math.ceil((1 + level) / 2 * (n + 1))
    # A change of a score lies in [-1, 1], as the report's intervals do.
    return [max(-1.0, v[lo - 1]) if lo >= 1 else -1.0, min(1.0, v[hi - 1]) if hi <= n else 1.0]


def odds(drawn: list[dict[str, float]], half_widths: dict[str, float], max_drop: float) -> dict[str, float]:
    """The share of draws whose changes, each with the half-width of its task's final interval, give each final
    verdict. A verdict is forecast "beyond doubt" only at odds of 0.95 or more: a point forecast past the budget
    with a wide interval is not a FAIL."""
    counts = dict.fromkeys(VERDICTS, 0)
    for d in drawn:
        counts[verdict(d, half_widths, max_drop)] += 1
    return {v: c / len(drawn) for v, c in counts.items()}


def brier(calibration: list[dict], tasks: list[str], inputs: str) -> list[float] | None:
    """How well forecasts from `inputs` foretell the calibration runs' own verdicts: each run forecast from the
    others (its own task sizes and budget), the Brier score of the odds against its verdict (0: sure and right; 2:
    sure and wrong), one per run; None with too few runs to fit."""
    scores = []
    for i, run in enumerate(calibration):
        drawn = draws(calibration[:i] + calibration[i + 1:], tasks, run["x"], inputs)
        if not drawn:
            return None
        chances = odds(drawn, {t: half_width(run["tasks"][t]["n"]) for t in tasks}, run["max_drop"])
        scores.append(sum((chances[v] - (v == run["verdict"])) ** 2 for v in VERDICTS))
    return scores


def _paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """How much lower `after`'s scores are than `before`'s, run by run, on average, and that mean's standard
    error."""
    gains = [b - a for b, a in zip(before, after)]
    mean = sum(gains) / len(gains)
    spread = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) if len(gains) > 1 else math.inf
    return mean, spread / math.sqrt(len(gains))


def _inputs(x: list[float], inputs: str) -> list[float]:
    """A run's inputs to the fit: [1, log KLs] with the probes, [1] without."""
    return x if inputs == "probes" else x[:1]


@dataclass
class Fit:
    """One task's least-squares coefficients."""

    beta: list[float]

    @classmethod
    def of(cls, inverse: list[list[float]], xs: list[list[float]], ys: list[float]) -> Fit:
        """The fit of ys on xs, given (X'X)^-1 of xs."""
        xty = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(len(inverse))]
        return cls([sum(row[j] * xty[j] for j in range(len(row))) for row in inverse])

    def at(self, x: list[float]) -> float:
        return sum(b * v for b, v in zip(self.beta, x))


def fit(xs: list[list[float]], ys: list[float]) -> Fit | None:
    """Least squares of ys on xs (rows with a leading 1), or None with no more rows than coefficients plus one (no
    error left to measure) or X'X singular."""
    if len(xs) <= len(xs[0]) + 1:
        return None
    inverse = _gram_inverse(xs)
    return None if inverse is None else Fit.of(inverse, xs, ys)


def _gram_inverse(xs: list[list[float]]) -> list[list[float]] | None:
    """(X'X)^-1 of the rows xs, or None when X'X is singular."""
    p = len(xs[0])
    return _inverse([[sum(x[i] * x[j] for x in xs) for j in range(p)] for i in range(p)])


def _product(inverse: list[list[float]], u: list[float], v: list[float]) -> float:
    """u' (X'X)^-1 v."""
    return sum(u[i] * inverse[i][j] * v[j] for i in range(len(u)) for j in range(len(v)))


def verdict(predicted: dict[str, float], half_widths: dict[str, float], max_drop: float) -> str:
    """The verdict the final evaluation would give if each task's change were as forecast, with the interval
    half-width its number of examples gives: PASS when every task's interval lies above -max_drop, FAIL when one lies
    wholly below it, else INCONCLUSIVE."""
    if any(d + half_widths[t] < -max_drop for t, d in predicted.items()):
        return "FAIL"
    if all(d - half_widths[t] > -max_drop for t, d in predicted.items()):
        return "PASS"
    return "INCONCLUSIVE"


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
