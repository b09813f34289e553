"""Leave-one-out replay of pruning on the forecast (`finetune sweep --prune`, `eval.on_over_budget: stop`) over the
runs of a calibration file: each run walks through the forecasts it would make while training with the default
probe schedule (after the last probe within its first 10% of updates, then after each later probe but the last that
other runs have at the same share of theirs), each forecast fitted on all the other runs, never on itself, and stops
at the first that is FAIL beyond doubt. Prints and writes a table: where each run would have stopped, what it
measured at its end, the updates pruning saves, and every run stopped that did not fail.

    python bench/forecast_pruning.py bench/forecast/runs.jsonl --out bench/forecast/pruning.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.probes import logged_points  # noqa: E402
from finetune.reports.forecast import read_rows, row_forecast  # noqa: E402


def walk(run: dict, others: list[dict]) -> list[dict]:
    """The forecasts `run` makes as it trains with the default probe schedule, in order, each from the other runs
    probed at the same share of their updates; up to and including the first FAIL beyond doubt."""
    made = []
    for step in logged_points(run["probes"], run["max_steps"]):
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
    args = p.parse_args()
    rows = [r for r in read_rows(args.runs) if r.get("reproduced")]
    lines = [f"# Pruning on the forecast, replayed leave-one-out over {len(rows)} runs", "",
             "| run | updates | forecasts made (update: runs, odds of FAIL vouched) | stopped after | final verdict |",
             "|---|---|---|---|---|"]
    stopped = wrong = saved = total = 0
    for i, run in enumerate(rows):
        made = walk(run, rows[:i] + rows[i + 1:])
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
