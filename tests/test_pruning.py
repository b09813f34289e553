"""`finetune sweep --prune` (finetune/pruning.py, sweep.py): the grid as an Optuna study, runs stopped at a forecast
of FAIL beyond doubt and kept on the plane marked as pruned, the sweep's finished runs calibrating the later ones."""

import json
import re
import subprocess
import sys

import optuna
from conftest import calibration, conflicting_recipe, metrics

from finetune.pruning import storage


def sweep(recipe, *args):
    proc = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(recipe), "--grid", "train.lr=1e-4,0.003",
                           "--prune", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def trials(root):
    study = optuna.load_study(study_name=root.name, storage=storage(root / "study.journal"))
    return {t.params["run"]: t for t in study.get_trials()}


def test_a_sweep_prunes_the_runs_forecast_to_fail_beyond_doubt_and_keeps_them_on_the_plane_marked(
        tmp_path, base_dir, tasks):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks,
                                forecast_calibration=str(calibration(tmp_path / "fail.jsonl", -0.5)))
    proc = sweep(recipe)
    root = tmp_path / "runs" / "r-sweep"
    states = {name: t.state for name, t in trials(root).items()}
    assert states == {"lr=1e-4": optuna.trial.TrialState.PRUNED, "lr=0.003": optuna.trial.TrialState.PRUNED}
    for name in states:  # stopped at the forecast (update 2 of 20), then measured there
        assert metrics(root / name)[-1]["step"] == 2
        report = json.loads((root / name / "forgetting" / "report.json").read_text())
        assert report["forecast"]["pruned"]["step"] == 2 and report["forecast"]["pruned"]["fail_odds"] >= 0.95
        md = (root / name / "forgetting" / "report.md").read_text()
        # Measured part-trained: whether the final change's interval holds it is not asked.
        assert "Pruned by its sweep here" in md and "| original | -0.500 [-0.505, -0.495] |" in md
        assert [line for line in md.splitlines() if line.startswith("| original | -0.500")][0].endswith("| - |")
    compared = json.loads((root / "compare" / "compare.json").read_text())
    assert all(r["pruned"]["step"] == 2 and r["drop"] is not None for r in compared["runs"])
    # Measured after 2 updates, a run may well pass; a pruned run is still neither recommended nor on the front.
    assert compared["recommended"] is None and not any(r["pareto"] for r in compared["runs"])
    assert "pruned at update 2 (measured there:" in (root / "compare" / "compare.md").read_text()
    assert "stopping after step 2: pruned by the sweep" in proc.stdout
    assert "ended on their forecast, measured where they stopped: lr=1e-4 (pruned at update 2), lr=0.003 (pruned " \
        "at update 2)" in proc.stdout
    # A rerun keeps what the study holds: nothing is trained again.
    again = sweep(recipe)
    assert "[1/2]" not in again.stdout and "recommended run:" in again.stdout


def test_a_doubtful_forecast_prunes_nothing_and_each_finished_run_calibrates_the_next(tmp_path, base_dir, tasks):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks, forecast_calibration=str(
        calibration(tmp_path / "wide.jsonl", -0.5, spread=0.5)))
    sweep(recipe, "train.max_steps=10")
    root = tmp_path / "runs" / "r-sweep"
    done = trials(root)
    assert {t.state for t in done.values()} == {optuna.trial.TrialState.COMPLETE}
    forecasts = {name: next(m["forecast"] for m in metrics(root / name) if "forecast" in m) for name in done}
    assert not any(f.get("pruned") for f in forecasts.values())
    # The grid's order: the second run's forecast drew on the 20 given runs and the first, finished, one.
    assert forecasts["lr=1e-4"]["runs"] == 20 and forecasts["lr=0.003"]["runs"] == 21
    rows = [json.loads(x) for x in (root / "calibration.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and {r["run"] for r in rows[20:]} == {str(root / n) for n in ("lr=1e-4", "lr=0.003")}
    assert rows[20]["verdict"] == json.loads((root / "lr=1e-4" / "forgetting" / "report.json").read_text())[
        "verdict"]["status"]


def test_workers_that_share_a_study_train_each_run_once(tmp_path, base_dir, tasks):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks, forecast_calibration=str(
        calibration(tmp_path / "wide.jsonl", -0.5, spread=0.5)))
    grid = ["--grid", "train.lr=1e-4,3e-4,1e-3,0.003", "train.max_steps=4", "--prune"]
    workers = [subprocess.Popen([sys.executable, "-m", "finetune", "sweep", str(recipe), *grid], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outputs]
    done = trials(tmp_path / "runs" / "r-sweep")
    assert sorted(done) == ["lr=0.003", "lr=1e-3", "lr=1e-4", "lr=3e-4"]
    assert {t.state for t in done.values()} == {optuna.trial.TrialState.COMPLETE}
    started = [m[1] for out, _ in outputs for m in re.finditer(r"^\[\d+/4\] (\S+) \(trial", out, re.M)]
    assert sorted(started) == sorted(done)  # each run trained by one worker, once
    # The worker that finished last compared them all.
    assert sum("recommended run:" in out for out, _ in outputs) >= 1
    assert len(json.loads((tmp_path / "runs" / "r-sweep" / "compare" / "compare.json").read_text())["runs"]) == 4


def test_a_pruning_sweep_without_probes_is_refused_in_one_line(tmp_path, base_dir, tasks):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks)
    proc = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(recipe), "train.probe_every=null",
                           "--grid", "train.lr=1e-4,0.003", "--prune"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--prune forecasts each run from its first probes" in proc.stderr and "train.probe_every: 0" in proc.stderr
