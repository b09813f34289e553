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
from .recipe import load_recipe
from .report import compare_runs


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


def _slug(overrides: list[str]) -> str:
    """`train.lr=1e-4`, `lora.r=8` -> `lr=1e-4_r=8`: the folder name of that run."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (o.partition("=") for o in overrides)]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))


def plan(recipe_path: Path, grid: list[tuple[str, list[str]]], base_overrides: list[str]) -> tuple[Path, list]:
    """(sweep folder, [(run folder, overrides)]); every combination is validated before anything runs."""
    recipe = load_recipe(recipe_path, base_overrides)
    root = Path(recipe.output.dir + "-sweep")
    runs = []
    for values in itertools.product(*(vals for _, vals in grid)):
        overrides = [f"{key}={value}" for (key, _), value in zip(grid, values)]
        out = root / _slug(overrides)
        checked = load_recipe(recipe_path, [*base_overrides, *overrides, f"output.dir={out}"])
        if not checked.eval.tasks:
            raise SweepError(f"{recipe_path} lists no eval.tasks: a sweep compares runs by what they forgot.")
        runs.append((out, [*base_overrides, *overrides, f"output.dir={out}"]))
    return root, runs


def command(recipe_path: Path, overrides: list[str], launch_config: str | None) -> list[str]:
    head = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_config, "-m", "finetune"]
            if launch_config else [sys.executable, "-m", "finetune"])
    return [*head, "train", str(recipe_path), *overrides]


def sweep(recipe_path: Path, grid_items: list[str], base_overrides: list[str], launch_config: str | None,
          print_only: bool) -> dict | None:
    root, runs = plan(recipe_path, parse_grid(grid_items), base_overrides)
    if print_only:
        for _, overrides in runs:
            print(shlex.join(command(recipe_path, overrides, launch_config)))
        print(f"# then: finetune report {' '.join(str(out) for out, _ in runs)} --out {root / 'compare'}")
        return None
    for i, (out, overrides) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {' '.join(overrides[len(base_overrides):-1])}", flush=True)
        # A process per run: each gets a clean Accelerate state, and a finished run is simply skipped on rerun.
        done = subprocess.run(command(recipe_path, overrides, launch_config))
        if done.returncode != 0:
            raise SweepError(f"run {out} failed (exit {done.returncode}); fix it and rerun the sweep: finished "
                             "runs are kept and skipped.")
    return compare_runs([out for out, _ in runs], root / "compare")
