"""Leave-one-out validation of the forecast of final forgetting (finetune/reports/forecast.py) on the runs
bench/forecast_calibration.py paired with their probes: each run forecast from a fit on all the others, never on
itself. Prints and writes a table (every run, misses included), the coverage of the prediction intervals, how often
the forecast verdict equals the final one, and a plot of forecast against measured change.

    python bench/forecast_validate.py bench/forecast/runs.jsonl --out bench/forecast/validation.md
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.probes import forecast_points, logged_points, schedule  # noqa: E402
from finetune.reports.forecast import (BEYOND_DOUBT, FEWEST, LEVEL, VERDICTS, change_text, read_rows,  # noqa: E402
                                       row_forecast, verdict)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--point", type=int, default=0,
                   help="which of a run's forecasts with the default probe schedule: 0 = the first, after the last "
                        "probe within its first 10%% of updates (update 4 of 60); 1 = the next (8 of 60); ...")
    args = p.parse_args()
    rows = read_rows(args.runs)
    used = []
    for r in rows:
        points = logged_points(r["probes"], r["max_steps"])
        if r.get("reproduced") and len(points) > args.point:
            used.append({**r, "step": points[args.point]})
    tasks = sorted(set.intersection(*(set(r["tasks"]) for r in used)))
    where = ("the probes of the first 10% of updates" if args.point == 0 else
             f"the probes of each run's forecast {args.point + 1}, after update "
             f"{forecast_points(schedule(0, 60), 60)[args.point]} of 60 or its share of other lengths")
    lines = [f"# Forecast of final forgetting, leave-one-out ({len(used)} runs of {len(rows)} paired; "
             f"{where})", "",
             "| run | probe step | KL general | KL task | " + " | ".join(f"{t}: forecast [{LEVEL:.0%} PI] / measured"
                                                                  for t in tasks)
             + " | inputs | forecast verdict (odds) | final verdict | a second suite's agreement |",
             "|---" * (7 + len(tasks)) + "|"]
    covered = total = agree = sure = sure_right = 0
    brier = ceiling = 0.0
    inputs = []
    points = []
    left_out, done = 0, []
    for i, r in enumerate(used):
        # The forecast a run makes during training, from the other runs probed at the same share of their updates,
        # with this run's own task sizes for the verdict's intervals.
        made = row_forecast(r, used[:i] + used[i + 1:], r["step"])
        if made is None:  # fewer than FEWEST other runs probed there
            left_out += 1
            continue
        done.append(r)
        cells = []
        for t in tasks:
            c, measured = made["tasks"][t], r["tasks"][t]["delta"]
            inside = c["interval"][0] <= measured <= c["interval"][1]
            covered += inside
            total += 1
            points.append((c["change"], *c["interval"], measured, t))
            cells.append(f"{change_text(c)} / {measured:+.3f}{'' if inside else ' **miss**'}")
        forecast = made["verdict"]  # the most likely final verdict
        agree += forecast == r["verdict"]
        brier += sum((made["odds"][v] - (v == r["verdict"])) ** 2 for v in VERDICTS)
        inputs.append(made["inputs"])
        repeat = second_suite(r, tasks)
        ceiling += repeat
        if made["beyond_doubt"]:  # what `eval.on_over_budget: stop` could act on
            sure += 1
            sure_right += forecast == r["verdict"]
        forecast_cell = f"{forecast} ({made['odds'][forecast]:.2f}{', beyond doubt' if made['beyond_doubt'] else ''})"
        probe = r["probes"][str(r["step"])]  # JSON keys are strings
        lines.append(f"| {Path(r['run']).name} | {r['step']} | {probe['probe_kl_general']:.3f} | "
                     f"{probe['probe_kl_task']:.3f} | " + " | ".join(cells)
                     + f" | {made['inputs']} | {forecast_cell} | {r['verdict']}"
                     + ("" if forecast == r["verdict"] else " **differs**") + f" | {repeat:.2f} |")
    finals = [r["verdict"] for r in done]
    common = max(set(finals), key=finals.count)
    hits = finals.count(common)
    lines += ["", f"Prediction intervals covering the measured change: {covered} of {total} ({covered / total:.0%}). "
              f"Most likely forecast verdict equal to the final verdict: {agree} of {len(done)} "
              f"({agree / len(done):.0%}). Forecast beyond doubt (odds at least {BEYOND_DOUBT}): {sure} run(s), of "
              f"which {sure_right} right.",
              f"Brier score of the verdict odds (0: sure and right, 2: sure and wrong): {brier / len(done):.3f}. "
              f"Forecasts from the probes: {inputs.count('probes')} of {len(done)}; from the calibration runs' "
              "spread alone (the probes forecast them no better, leave-one-out within the calibration): "
              f"{inputs.count('none')}.",
              f"For scale, always forecasting the most frequent final verdict ({common}) would match {hits} of "
              f"{len(done)}. A forecaster that knew each run's measured changes exactly would match the verdict of "
              f"a second suite of the same size in {ceiling:.1f} of {len(done)} (last column: each task's change "
              "drawn around the measured one with the spread its paired 95% interval gives, 4,000 draws, the "
              "verdict's rule applied): the verdict of a run near the budget's edge is itself a toss-up.",
              "Odds: each calibration run's leave-one-out error added to the forecast (jackknife+), all tasks of a "
              "run together, the final verdict's rule applied with the interval half-width the task's n gives; "
              f"intervals: the draws' conformal {LEVEL:.0%} quantiles.",
              f"Left out: {len(rows) - len(used)} run(s) whose first updates did not reproduce or had no probe "
              f"there, and {left_out} with fewer than {FEWEST} other runs probed at the same share of their updates."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    _plot(points, args.out.with_suffix(".png"), where)
    print(text)  # last: a closed pipe loses no file
    return 0


def second_suite(run: dict, tasks: list[str], draws: int = 4000) -> float:
    """How often a second suite of the same size would give the run's final verdict again if its measured changes
    were the truth: each task's change drawn from a normal curve with the spread of its paired 95% interval."""
    rng = random.Random(0)
    sd = {t: (run["tasks"][t]["ci95"][1] - run["tasks"][t]["ci95"][0]) / (2 * 1.96) for t in tasks}
    half = {t: 1.96 * sd[t] for t in tasks}
    same = sum(verdict({t: rng.gauss(run["tasks"][t]["delta"], sd[t]) for t in tasks}, half, run["max_drop"])
               == run["verdict"] for _ in range(draws))
    return same / draws


def _plot(points, path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for task in sorted({p[4] for p in points}):
        mine = [p for p in points if p[4] == task]
        ax.errorbar([p[3] for p in mine], [p[0] for p in mine],
                    yerr=[[p[0] - p[1] for p in mine], [p[2] - p[0] for p in mine]], fmt="o", capsize=2,
                    label=task, alpha=0.8)
    # A change of a score lies in [-1, 1]: the view is the measured range with a margin, wider intervals run off it.
    lo = min(p[3] for p in points) - 0.2
    hi = max(p[3] for p in points) + 0.2
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured final change")
    ax.set_ylabel(f"forecast ({LEVEL:.0%} PI) from {where}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
