"""A tuned LoRA model's whole forgetting evaluation, as a run measures it, with one of its speed-ups off and on,
alternated in one process so that the machine's drift over minutes does not decide the comparison:

- `--toggle merge`: the adapter as peft runs it, and merged into the weights for the duration
  (finetune.model.adapter_merged); results in bench/adapter_merge.md;
- `--toggle kept-prefixes`: each batch running the prefix it shares with others (few-shot turns, a system turn), and
  each such prefix run once per evaluation (finetune.measure.prefix_sharing.kept_prefixes); bench/kept_prefixes.md.

    python bench/tuned_eval_ab.py RUN --toggle merge|kept-prefixes [--repeats 2] [--out FILE.md]

RUN: a finished LoRA run folder (its recipe.yaml and final/), e.g. a fresh clone's runs/demo-lora after
scripts/demo.sh; run from the folder it was trained in (its recipe names data by relative paths). The base's scores
and drift inputs come from the cache the run left (or are measured first, untimed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--toggle", choices=("merge", "kept-prefixes"), required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, help="default: bench/adapter_merge.md or bench/kept_prefixes.md")
    args = p.parse_args()
    default = {"merge": "adapter_merge.md", "kept-prefixes": "kept_prefixes.md"}[args.toggle]
    args.out = args.out or ROOT / "bench" / default
    sys.path.insert(0, str(ROOT))
    import peft
    import torch

    import finetune.measure.drift as drift_module
    import finetune.measure.evaluate as evaluate
    from finetune.measure import prefix_sharing
    from finetune.model import adapter_merged, load_model
    from finetune.model_files import load_tokenizer
    from finetune.precision import cpu_flags
    from finetune.quiet import silence_lm_eval
    from finetune.recipe import load_recipe

    silence_lm_eval()
    recipe = load_recipe(args.run / "recipe.yaml")
    tokenizer = load_tokenizer(recipe.model)
    model = peft.PeftModel.from_pretrained(load_model(recipe.model, None), args.run / "final")
    fe = evaluate.ForgettingEval(recipe.eval, recipe.model, tokenizer)
    fe.evaluate_base(model)
    def timed(work, seconds: list):
        """`work`, adding the seconds of each call to `seconds`."""
        def call(*a, **kw):
            start = time.perf_counter()
            out = work(*a, **kw)
            seconds.append(time.perf_counter() - start)
            return out
        return call

    drift_seconds, prefix_seconds = [], []
    evaluate.kl_drift = timed(evaluate.kl_drift, drift_seconds)
    # Both modules call it: the tasks' prefixes (prefix_sharing) and the drift's (drift imports it by name).
    prefix_sharing.repeated_prefix_cache = drift_module.repeated_prefix_cache = timed(
        prefix_sharing.repeated_prefix_cache, prefix_seconds)
    kept = prefix_sharing.kept_prefixes
    ways = {"merge": [("the adapter as peft runs it", False), ("merged into the weights", True)],
            "kept-prefixes": [("each batch's prefix run by it", False), ("each prefix once per evaluation", True)]}
    rows = []
    for repeat in range(1, args.repeats + 1):
        for way, on in ways[args.toggle]:
            if args.toggle == "merge":
                evaluate.adapter_merged = adapter_merged if on else (lambda m: contextlib.nullcontext(False))
            else:
                prefix_sharing.kept_prefixes = kept if on else contextlib.nullcontext
            drift_seconds.clear()
            prefix_seconds.clear()
            start = time.perf_counter()
            point = fe.evaluate(model, None)
            seconds = time.perf_counter() - start
            rows.append({"repeat": repeat, "way": way, "seconds": round(seconds, 1),
                         "drift_seconds": round(sum(drift_seconds), 1),
                         "prefix_passes": len(prefix_seconds), "prefix_seconds": round(sum(prefix_seconds), 2),
                         "scores": {s: round(x.value, 4) for s, x in {**point.tasks, **point.targets}.items()},
                         "kl": {k: round(d.kl, 4) for k, d in point.drift.items()}})
            print(rows[-1], file=sys.stderr, flush=True)
    by_way = {w: [r["seconds"] for r in rows if r["way"] == w] for w in dict.fromkeys(r["way"] for r in rows)}
    off_s, on_s = (statistics.median(v) for v in by_way.values())
    bf16_flags = ", ".join(sorted(f for f in cpu_flags() if "bf16" in f)) or "no bf16"
    header = (f"{platform.machine()}, CPU flags: {bf16_flags}"
              f"; torch {torch.__version__}, {torch.get_num_threads()} thread(s); evaluation precision "
              f"{fe.autocast or 'float32'}; run {args.run}.")
    table = ["| repeat | way | seconds | of which drift | of which shared prefixes (passes) | scores | drift KL |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['repeat']} | {r['way']} | {r['seconds']} | {r['drift_seconds']} | "
              f"{r['prefix_seconds']} ({r['prefix_passes']}) | "
              f"{', '.join(f'{Path(s).stem} {v:.3f}' for s, v in r['scores'].items())} | "
              f"{', '.join(f'{k} {v:.3f}' for k, v in r['kl'].items())} |" for r in rows]
    (off, _), (on, _) = ways[args.toggle]
    summary = f"Median {off_s:.1f} s {off}, {on_s:.1f} s {on}: {off_s / on_s:.2f}x."
    text = "\n".join([header, "", *table, "", summary]) + "\n"
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n",
                                             encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
