"""`finetune sweep RECIPE --grid key=v1,v2 ...`: every combination of the grid as its own run (one process each,
one after the other; or printed as commands to launch on a cluster), then one comparison report with the
learning-forgetting plane, the Pareto front and the recommended run for the recipe's forgetting budget."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text
from .recipe import dump_recipe, load_recipe
from .reports.compare import compare_runs
from .reports.forecast import calibration_row, cut_short


class SweepError(UserError):
    """A grid that cannot be run as given."""


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`train.lr=1e-5,1e-4` -> ("train.lr", ["1e-5", "1e-4"]). Commas inside [...] or {...} belong to the value."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SweepError(f"grid item {item!r} must look like section.key=v1,v2 (e.g. train.lr=1e-5,1e-4).")
        grid.append((key, [v.strip() for v in re.split(r",(?![^\[{]*[\]}])", values)]))
    return grid


NULL = ("null", "~", "None")


def _slug(overrides: list[str]) -> str:
    """`train.lr=1e-4`, `lora.r=8` -> `lr=1e-4_r=8`: the folder name of that run."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (o.partition("=") for o in overrides)]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts)) or "recipe"


def variants(grid: list[tuple[str, list[str]]]) -> tuple[list[list[str]], list[str]]:
    """(the overrides of each run, the overrides every run shares). A key with several values is an axis; one with a
    single value applies to every run, like an override on the command line. `section=null` (lora=null) is a
    variant of its own, without that section: `section.*` axes (lora.r=8,64) apply only to the variants that have
    the section, so `lora.r=8,64 lora=null` is three runs, not two full fine-tunings."""
    nullable = [key for key, values in grid if "." not in key and any(v in NULL for v in values)]
    shared = [f"{key}={values[0]}" for key, values in grid if len(values) == 1 and key not in nullable]
    axes = [(key, values) for key, values in grid if len(values) > 1 or key in nullable]
    groups: list[tuple[int, list[list[str]]]] = []  # (position in the grid, the group's choices)
    for section in nullable:
        inner = [(key, values) for key, values in axes if key.startswith(section + ".")]
        heads = [[f"{section}={v}"] for key, values in axes if key == section for v in values if v not in NULL]
        choices = [head + [f"{key}={v}" for (key, _), v in zip(inner, picked)]
                   for head in heads or [[]] for picked in itertools.product(*(values for _, values in inner))]
        groups.append((min(i for i, (key, _) in enumerate(axes) if key.split(".")[0] == section),
                       choices + [[f"{section}=null"]]))
    for i, (key, values) in enumerate(axes):
        if key.split(".")[0] not in nullable:
            groups.append((i, [[f"{key}={v}"] for v in values]))
    groups.sort(key=lambda g: g[0])
    return [sum(picked, []) for picked in itertools.product(*(choices for _, choices in groups))], shared


def plan(recipe_path: Path, grid: list[tuple[str, list[str]]], base_overrides: list[str],
         need_tasks: bool = True) -> tuple[Path, list]:
    """(sweep folder, [(run folder, overrides)]); every combination is validated before anything runs, and one that
    resolves to the same recipe as an earlier one is left out."""
    runs_overrides, shared = variants(grid)
    base = [*base_overrides, *shared]
    recipe = load_recipe(recipe_path, base)
    if need_tasks and not recipe.eval.tasks:
        raise SweepError(f"{recipe_path} lists no eval.tasks: a sweep compares runs by what they forgot. Add "
                         "eval.tasks, or use --print-commands to only print the runs' commands.")
    root = Path(recipe.output.dir + "-sweep")
    runs, seen = [], {}
    for overrides in runs_overrides:
        out = root / _slug(overrides)
        checked = load_recipe(recipe_path, [*base, *overrides, f"output.dir={out}"])
        checked.output.dir = ""
        key = dump_recipe(checked)
        if key in seen:
            print(f"note: {' '.join(overrides)} is the same run as {seen[key]}; left out", file=sys.stderr)
            continue
        seen[key] = " ".join(overrides) or "the recipe as it is"
        runs.append((out, [*base, *overrides, f"output.dir={out}"]))
    return root, runs


def command(recipe_path: Path, overrides: list[str], launch_config: str | None) -> list[str]:
    head = [sys.executable, "-m", "finetune"] + (["launch", "--config_file", launch_config] if launch_config else [])
    return [*head, "train", str(recipe_path), *overrides]


def sweep(recipe_path: Path, grid_items: list[str], base_overrides: list[str], launch_config: str | None,
          print_only: bool, prune: bool = False, storage: str | None = None) -> dict | None:
    if prune:
        if print_only:
            raise SweepError("--prune runs the sweep as an Optuna study; --print-commands only prints the runs. "
                             "Use one of them.")
        calibration = _calibration_file(recipe_path, base_overrides)
        base_overrides = [*base_overrides, f"eval.forecast_calibration={calibration}"]
    root, runs = plan(recipe_path, parse_grid(grid_items), base_overrides, need_tasks=not print_only)
    if prune:
        busy = _run_study(recipe_path, runs, launch_config, root, storage or str(root / "study.journal"))
        if busy:
            print(f"{len(busy)} run(s) still training in other workers ({', '.join(busy)}): the last worker to "
                  f"finish compares them all (or: finetune report {' '.join(str(out) for out, _ in runs)} --out "
                  f"{root / 'compare'})")
            return None
        return compare_runs([out for out, _ in runs], root / "compare")
    if print_only:
        for _, overrides in runs:
            print(shlex.join(command(recipe_path, overrides, launch_config)))
        if load_recipe(recipe_path, runs[0][1]).eval.tasks:
            print(f"# then: finetune report {' '.join(str(out) for out, _ in runs)} --out {root / 'compare'}")
        return None
    for i, (out, overrides) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {out.name}", flush=True)
        # A process per run: each gets a clean Accelerate state, and a finished run is simply skipped on rerun.
        done = subprocess.run(command(recipe_path, overrides, launch_config))
        if done.returncode != 0:
            raise SweepError(f"run {out} failed (exit {done.returncode}); fix it and rerun the sweep: finished "
                             "runs are kept and skipped.")
    return compare_runs([out for out, _ in runs], root / "compare")


# ---------------------------------------------------------------- pruning (--prune)


def _calibration_file(recipe_path: Path, base_overrides: list[str]) -> Path:
    """The calibration file a pruning sweep's runs forecast from: the recipe's own (eval.forecast_calibration), and
    this sweep's finished runs as they come (`_recalibrate`). Made before the runs' recipes are checked, which want
    it to exist."""
    recipe = load_recipe(recipe_path, base_overrides)
    if recipe.train.probe_every is None:
        raise SweepError(f"--prune forecasts each run from its first probes, and {recipe_path} turns them off "
                         "(train.probe_every: null): set train.probe_every: 0 (the default), or leave out --prune.")
    path = Path(recipe.output.dir + "-sweep") / "calibration.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        given = recipe.eval.forecast_calibration
        if given is None:
            print(f"note: {recipe_path} sets no eval.forecast_calibration: the runs' forecasts calibrate on this "
                  "sweep's finished runs alone, and can call a FAIL beyond doubt only once 19 of them agree",
                  file=sys.stderr)
        atomic_write_text(path, Path(given).read_text(encoding="utf-8") if given else "")
    return path


def _recalibrate(path: Path, own: list[Path], given: list[str]) -> None:
    """The calibration file again: the recipe's runs (`given`, its lines) and this sweep's finished runs."""
    rows = [json.dumps(row) for row in map(calibration_row, own) if row is not None]
    atomic_write_text(path, "".join(line + "\n" for line in [*given, *rows]))


def _run_study(recipe_path: Path, runs: list, launch_config: str | None, root: Path, where: str) -> list[str]:
    """Every run of the grid as a trial of the sweep's Optuna study (finetune/pruning.py), in the grid's order. Runs
    whose trial finished or was pruned are kept (a rerun, another worker's); one whose process failed is queued
    again. A finished run's probes and result join the calibration of the runs after it. Returns the runs other
    workers are still training."""
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.trial import TrialState

    from . import pruning

    study = pruning.open_study(where, root.name)
    names = {out.name: (out, overrides) for out, overrides in runs}
    outs = [out for out, _ in runs]
    ours = {str(out) for out in outs}
    calibration = Path(load_recipe(recipe_path, runs[0][1]).eval.forecast_calibration)
    given = [line for line in calibration.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("run") not in ours]
    # Workers that start together queue each run once: the check and the queueing under one lock (a lock file,
    # as Optuna's journal storage takes on shared file systems).
    lock = JournalFileOpenLock(str(root / "queue.lock"))
    lock.acquire()
    try:
        taken = {_trial_run(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
        for name in names:
            if name not in taken:
                study.enqueue_trial({"run": name})
    finally:
        lock.release()
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()  # takes a queued run; no other worker can take the same one
        name = _trial_run(study.get_trials(deepcopy=False)[trial.number])
        if name not in names:  # another worker took the last queued run first, or one of another grid was left
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.suggest_categorical("run", list(names))  # the queued run becomes the trial's parameter
        out, overrides = names[name]
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
        report = out / "forgetting" / "report.json"
        head = f"[{done + 1}/{len(names)}] {name} (trial {trial.number} of study {root.name}, {where})"
        finished = 0
        if report.is_file():  # measured before this study (a sweep without --prune): kept as it is
            print(f"{head}: finished before; kept", flush=True)
        else:
            print(head, flush=True)
            _recalibrate(calibration, outs, given)
            try:
                finished = subprocess.run(command(recipe_path, overrides, launch_config),
                                          env=pruning.trial_env(where, root.name, trial._trial_id)).returncode
            except KeyboardInterrupt:
                study.tell(trial, state=TrialState.FAIL)
                raise
        if finished != 0 or not report.is_file():
            study.tell(trial, state=TrialState.FAIL)
            raise SweepError(f"run {out} failed (exit {finished}); fix it and rerun the sweep: finished and pruned "
                             "runs are kept, and this one is queued again.")
        measured = json.loads(report.read_text(encoding="utf-8"))
        trial.set_user_attr("verdict", measured["verdict"]["status"])
        trial.set_user_attr("run", str(out))
        if cut_short(measured.get("forecast")):  # pruned, or stopped by its recipe's eval.on_over_budget: stop
            study.tell(trial, state=TrialState.PRUNED)
        else:
            gains = [c["delta"] for c in measured["targets"].values()]
            study.tell(trial, sum(gains) / len(gains) if gains else 0.0)
    _recalibrate(calibration, outs, given)
    return [name for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if (name := _trial_run(t)) in names]


def _trial_run(trial) -> str | None:
    """The run a trial stands for: its parameter, or while it waits in the queue, the one it was queued with."""
    return trial.params.get("run", trial.system_attrs.get("fixed_params", {}).get("run"))
