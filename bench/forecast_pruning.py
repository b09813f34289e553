"""Leave-one-out replay of pruning on the forecast (`finetune sweep --prune`, `eval.on_over_budget: stop`) over the
runs of a calibration file: each run walks through the forecasts it would make while training with the default
probe schedule (after the last probe within its first 10% of updates, then after each later probe but the last that
other runs have at the same share of theirs), each forecast fitted on all the other runs, never on itself, and stops
at the first that is FAIL beyond doubt. Prints and writes a table: where each run would have stopped, what it
measured at its end, the updates pruning saves, and every run stopped that did not fail.

    python bench/forecast_pruning.py bench/forecast/runs.jsonl --out bench/forecast/pruning.md
    python bench/forecast_pruning.py bench/forecast/runs.jsonl --probe-cost 0.83 --out bench/forecast/pruning_budget.md

--probe-cost C replays the default train.probe_budget (5%) on a machine where a probe takes C updates' time: a probe
after the first is made only while the probes take at most 5% of the updates' time (C = 0.83 on the 2-core
AVX512-BF16 machine: 1.57 s a probe, ~1.9 s an update; 60 updates keep 3 probes, 120 keep 7, 30 only the first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.probes import logged_points, schedule, within_budget  # noqa: E402
from finetune.recipe import TrainSection  # noqa: E402
from finetune.reports.forecast import read_rows, row_forecast  # noqa: E402

BUDGET = TrainSection().probe_budget  # the default's


def walk(run: dict, others: list[dict], probe_cost: float | None = None) -> list[dict]:
    """The forecasts `run` makes as it trains with the default probe schedule, in order, each from the other runs
    probed at the same share of their updates; up to and including the first FAIL beyond doubt. With `probe_cost`
    (a probe's time in updates), only the probes train.probe_budget's default keeps."""
    n, made = run["max_steps"], []
    # The run's own rule (Probes.due), in updates' time: k probes made before this one, and each update one unit.
    kept = [s for k, s in enumerate(sorted(schedule(0, n)))
            if probe_cost is None or k == 0 or within_budget(k * probe_cost, probe_cost, s, s, n, BUDGET)]
    for step in logged_points(run["probes"], n):
        if step not in kept:
            break
        forecast = row_forecast(run, others, step)
        if forecast is None:  # fewer than 5 other runs probed there
            continue
        made.append(forecast)
        if forecast["verdict"] == "FAIL" and forecast["beyond_doubt"]:
            break
    return made


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--probe-cost", type=float, metavar="C",
                   help="a probe's time in updates: replay the default train.probe_budget (5%%) on such a machine")
    args = p.parse_args()
    rows = [r for r in read_rows(args.runs) if r.get("reproduced")]
    within = ("" if args.probe_cost is None else f", with the probes a {BUDGET:.0%} budget keeps where a probe "
              f"costs {args.probe_cost:g} updates")
    lines = [f"# Pruning on the forecast, replayed leave-one-out over {len(rows)} runs{within}", "",
             "| run | updates | forecasts made (update: runs, odds of FAIL vouched) | stopped after | final verdict |",
             "|---|---|---|---|---|"]
    stopped = wrong = saved = total = 0
    for i, run in enumerate(rows):
        made = walk(run, rows[:i] + rows[i + 1:], args.probe_cost)
        if not made:
            continue
        total += run["max_steps"]
        cells = ", ".join(f"{f['step']}: {f['runs']}, {f['vouched']['FAIL']:.2f}" for f in made)
        last = made[-1]
        pruned = last["verdict"] == "FAIL" and last["beyond_doubt"]
        if pruned:
            stopped += 1
            saved += run["max_steps"] - last["step"]
            wrong += run["verdict"] != "FAIL"
        flag = "" if not pruned or run["verdict"] == "FAIL" else " **stopped, yet did not fail**"
        lines.append(f"| {Path(run['run']).name} | {run['max_steps']} | {cells} | "
                     f"{last['step'] if pruned else '-'} | {run['verdict']}{flag} |")
    fails = sum(r["verdict"] == "FAIL" for r in rows)
    lines += ["", f"Stopped: {stopped} run(s), {wrong} of them not FAIL at their end; of the {fails} runs that failed, "
              f"{stopped - wrong} stopped early. Updates saved: {saved} of {total} ({saved / max(total, 1):.0%}).",
              "A run is stopped at odds of FAIL the other runs vouch for of at least 0.95 (finetune/reports/"
              "forecast.py); each forecast after the first uses only the runs probed at the same share of their "
              "updates."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)  # last: a closed pipe loses no file
    return 0


if __name__ == "__main__":
    sys.exit(main())
