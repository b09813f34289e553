"""`finetune sweep RECIPE --grid key=v1,v2 ...`: every combination of the grid as its own run (one process each,
one after the other; or printed as commands to launch on a cluster), then one comparison report with the
learning-forgetting plane, the Pareto front and the recommended run for the recipe's forgetting budget."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .errors import UserError
from .recipe import dump_recipe, load_recipe
from .reports.compare import compare_runs


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
          print_only: bool) -> dict | None:
    root, runs = plan(recipe_path, parse_grid(grid_items), base_overrides, need_tasks=not print_only)
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
