"""Time per update of a recipe (default: the demo's LoRA one) with and without `train.kl_to_base`. Prints a Markdown
table and writes it to --out.

    bash scripts/install.sh && python bench/kl_to_base.py            # rows_per_step 2 and 4, 8 rounds
    python bench/kl_to_base.py --rows 4 --rounds 3                   # a first look
    python bench/kl_to_base.py --threads 1                           # on a machine other jobs share

One process, one model: the run is set up once as `finetune train` would (`_set_up`, evaluation off), then each
round takes one update per setting (without the penalty, then with each rows_per_step), in an order that rotates
from round to round, on the run's own batches. Interleaving updates, not whole runs, keeps a change in load from
other jobs on a shared machine out of the ratios: the ratio is taken within each round, then the median over rounds.
Wall time and this process's CPU time are both shown; the first round (warm-up) is left out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune import mitigations  # noqa: E402
from finetune.checkpoint import open_run_dir  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402
from finetune.train import _set_up, epoch_batches, train_step  # noqa: E402


def kl_override(data: str, weight: float, rows: int) -> str:
    return f"train.kl_to_base={{weight: {weight}, datasets: [{{path: {data}, format: chat}}], rows_per_step: {rows}}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="recipes/demo-lora.yaml")
    parser.add_argument("--data", default="data/general/self_replay.jsonl")
    parser.add_argument("--rows", default="2,4", help="rows_per_step values to time, comma-separated")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default torch's own. On a machine "
                        "shared with other jobs, 1 keeps idle threads from spinning into the CPU times")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"output.dir={tmp}/run", "output.save_every=0", "eval.tasks=[]", "eval.target_tasks=[]",
                f"train.max_steps={(args.rounds + 1) * (len(rows) + 1)}", "train.warmup_steps=0"]
        recipe = load_recipe(args.recipe, base + [kl_override(args.data, args.weight, rows[0])])
        t = _set_up(recipe, open_run_dir(recipe, accept_changes=False))
        ctx = mitigations.Context(t.accelerator, t.engine, t.accelerator.unwrap_model(t.model), t.tokenizer)
        settings = {"off": []} | {
            f"rows_per_step {r}": mitigations.regularizers(
                load_recipe(args.recipe, base + [kl_override(args.data, args.weight, r)]), ctx) for r in rows}
        names = list(settings)
        batches = epoch_batches(t.accelerator, t.loader, recipe.train.grad_accum, 0, 0)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for round_ in range(args.rounds + 1):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                _, _, micro_batches = next(batches)
                for mb in micro_batches:
                    mb.pop("n_tokens")
                start, start_cpu = time.perf_counter(), time.process_time()
                train_step(t.accelerator, t.model, t.optimizer, t.scheduler, micro_batches,
                           recipe.train.max_grad_norm, settings[name], t.engine.clips_inside)
                if round_:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
            print(f"round {round_}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s" for n in names if wall[n]),
                  file=sys.stderr)

    def ratio(times: dict[str, list[float]], name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times["off"]))

    lines = [f"{args.recipe}, KL rows from {args.data}, weight {args.weight:g}; {args.rounds} rounds after one of "
             f"warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| kl_to_base | wall s per update (median) | ratio to off | CPU s per update (median) | ratio to off |",
             "|---|---|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {statistics.median(wall[name]):.3f} | {ratio(wall, name):.2f} | "
                     f"{statistics.median(cpu[name]):.3f} | {ratio(cpu, name):.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
