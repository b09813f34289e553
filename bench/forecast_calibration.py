"""The first updates of finished runs again, with the probes on (finetune/probes.py), paired with what each run's
final report measured: the data a forecast of final forgetting is fitted and validated on.

A run's first updates are deterministic (seeded data order, LoRA init and dropout), so training a finished run's
saved recipe again and stopping it after 10% of its updates gives the probes it would have logged. Each rerun is
checked against the run's own metrics.jsonl (the same loss at every update it reached) and left out if it differs
(data changed since, for example). Evaluation is switched off for the rerun: it does not change what is trained.

    python bench/forecast_calibration.py RUN [RUN ...] --out bench/forecast/runs.jsonl [--root DIR] [--share 0.1]

--root: the folder the runs were trained from (their recipes name data by relative paths); default the repository.
Each rerun is stopped with SIGTERM once it has logged 10% of its updates (the run saves a checkpoint and exits 75,
as on preemption), in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.reports.forecast import logged_probes, measured  # noqa: E402


def rerun(run: Path, root: Path, share: float) -> dict:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    max_steps = recipe["train"]["max_steps"]
    stop = max(1, math.ceil(share * max_steps))
    original = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "finetune", "train", str(run / "recipe.yaml"), f"output.dir={out}",
               "eval.tasks=[]", "eval.target_tasks=[]", "output.save_every=0", "--new-run"]
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None:
            if metrics.is_file() and sum(1 for _ in metrics.open()) >= stop:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        _, err = proc.communicate(timeout=600)
        logged = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    early = [m for m in logged if m["step"] <= stop]
    same = len(early) >= stop and all(abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(b["loss"]))
                                      for a, b in zip(early, original))
    report = json.loads((run / "forgetting" / "report.json").read_text())
    return {"run": str(run), "max_steps": max_steps, "stopped_after": stop, "reproduced": same,
            "seconds": round(time.perf_counter() - began, 1), "error": "" if logged else err[-2000:],
            "probes": logged_probes(early), **measured(report),
            "gain": {t: r["tuned"] for t, r in report["targets"].items()},
            "kl_chat": report.get("drift", {}).get("chat", {}).get("kl")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per run (appended)")
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--share", type=float, default=0.1, help="share of each run's updates to train again")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        row = rerun(run.resolve(), args.root.resolve(), args.share)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{run}: {row['verdict']}, reproduced {row['reproduced']}, probes at {sorted(row['probes'])}, "
              f"{row['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
