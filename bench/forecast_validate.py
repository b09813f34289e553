"""Leave-one-out validation of the forecast of final forgetting (finetune/reports/forecast.py) on the runs
bench/forecast_calibration.py paired with their probes: each run forecast from a fit on all the others, never on
itself. Prints and writes a table (every run, misses included), the coverage of the prediction intervals, how often
the forecast verdict equals the final one, and a plot of forecast against measured change.

    python bench/forecast_validate.py bench/forecast/runs.jsonl --out bench/forecast/validation.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.reports.forecast import BEYOND_DOUBT, change_text, forecast_run, read_calibration  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--share", type=float, default=0.1)
    args = p.parse_args()
    rows = args.runs.read_text().splitlines()
    used = read_calibration(args.runs, args.share)
    tasks = sorted(set.intersection(*(set(r["tasks"]) for r in used)))
    lines = [f"# Forecast of final forgetting, leave-one-out ({len(used)} runs of {len(rows)} paired; "
             f"probes of the first {args.share:.0%} of updates)", "",
             "| run | probe step | KL general | KL task | " + " | ".join(f"{t}: forecast [95% PI] / measured" for t in tasks)
             + " | forecast verdict (odds) | final verdict |", "|---" * (5 + len(tasks)) + "|"]
    covered = total = agree = sure = sure_right = 0
    points = []
    for i, r in enumerate(used):
        others = used[:i] + used[i + 1:]
        # The forecast a run makes during training, with this run's own task sizes for the verdict's intervals.
        made = forecast_run(others, r["probes"], r["max_steps"], r["max_drop"], args.share,
                            sizes={t: r["tasks"][t]["n"] for t in tasks})
        cells = []
        for t in tasks:
            c, measured = made["tasks"][t], r["tasks"][t]["delta"]
            inside = c["pi95"][0] <= measured <= c["pi95"][1]
            covered += inside
            total += 1
            points.append((c["change"], *c["pi95"], measured, t))
            cells.append(f"{change_text(c)} / {measured:+.3f}{'' if inside else ' **miss**'}")
        forecast = made["verdict"]  # the most likely final verdict
        agree += forecast == r["verdict"]
        if made["beyond_doubt"]:  # what `eval.on_over_budget: stop` could act on
            sure += 1
            sure_right += forecast == r["verdict"]
        forecast_cell = f"{forecast} ({made['odds'][forecast]:.2f}{', beyond doubt' if made['beyond_doubt'] else ''})"
        probe = r["probes"][str(r["step"])]  # JSON keys are strings
        lines.append(f"| {Path(r['run']).name} | {r['step']} | {probe['probe_kl_general']:.3f} | "
                     f"{probe['probe_kl_task']:.3f} | " + " | ".join(cells) + f" | {forecast_cell} | {r['verdict']}"
                     + ("" if forecast == r["verdict"] else " **differs**") + " |")
    finals = [r["verdict"] for r in used]
    common = max(set(finals), key=finals.count)
    hits = finals.count(common)
    lines += ["", f"Prediction intervals covering the measured change: {covered} of {total} ({covered / total:.0%}). "
              f"Most likely forecast verdict equal to the final verdict: {agree} of {len(used)} "
              f"({agree / len(used):.0%}). Forecast beyond doubt (odds at least {BEYOND_DOUBT}): {sure} run(s), of "
              f"which {sure_right} right.",
              f"For scale, always forecasting the most frequent final verdict ({common}) would match {hits} of "
              f"{len(used)}.",
              "Odds: each task's final change drawn from its forecast (point + scale x t), the final verdict's rule "
              "applied with the interval half-width the task's n gives, tasks taken as independent.",
              f"Left out: {len(rows) - len(used)} run(s) whose first updates did not reproduce or had no probe."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    _plot(points, args.out.with_suffix(".png"))
    return 0


def _plot(points, path: Path) -> None:
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
    ax.set_ylabel("forecast from the first 10% of updates (95% PI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
