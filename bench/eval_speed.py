"""How fast finetune evaluates forgetting, part by part, against lm-eval's own path on the same model and tasks.

Loads the recipe's base model once and times, on the recipe's original and target tasks and the drift texts:
  - multiple choice (log-likelihoods) and generation tasks: lm-eval's HF model as `lm_eval --model hf` runs it (the
    reference a user would otherwise pick; the same in-memory model, so loading is not timed) at batch 8 (finetune's
    evaluation before eval.share_prefixes), for generation also at the recipe's eval.batch_size, then finetune's path
    (eval.share_prefixes: each multiple-choice prompt once for its options, each batch's common prompt prefix once;
    for multiple choice also without the common prefix, the path before it);
    and how many examples score differently between the first and the last;
  - drift: the KL of the model against itself on the base's drift texts (two forward passes, as for a tuned model),
    one text per pass (finetune before batching them) and in finetune's batches, and the base's one-time sampling
    of those texts;
  - training, for scale: the median tokens/s of a finished run's metrics.jsonl (--train-run), and its 60-update time;
  - where --train-run holds a LoRA adapter, that tuned model's whole evaluation (tasks and both drift kinds, as a
    run measures it), with the adapter as peft runs it and merged into the weights for the duration.

    python bench/eval_speed.py                         # the demo's recipe and suites; writes bench/eval_speed.md
    python bench/eval_speed.py --train-run runs/demo-lora

Tokens count what each request holds (prompt and continuation, or prompt and generated reply), the same unit for
both paths, so tokens/s ratios are time ratios. Figures are of the machine that ran it (CPU flags in the header).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tokens_of(tokenizer, score) -> int:
    """Tokens the logged requests of one TaskScore hold: prompt + option for each option of a multiple-choice
    example; prompt + generated reply for a generation (each request's arguments: prompt, option or settings)."""
    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    count = 0
    for log in score.log.values():
        for sample in log["samples"]:
            for (prompt, second), resp in zip(sample["arguments"], sample["resps"]):
                count += length(prompt) + length(second if isinstance(second, str) else str(resp[0]))
    return count


def timed(work, *args, **kwargs):
    start = time.perf_counter()
    value = work(*args, **kwargs)
    return value, time.perf_counter() - start


def cpu_flags() -> str:
    from finetune.precision import cpu_flags as flags

    found = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags()]
    return ", ".join(found) or "none of amx_bf16/avx512_bf16/avx512f/avx2 (or unknown)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/demo-lora.yaml")
    p.add_argument("--limit", type=int, help="examples per task, and drift prompts per kind (default: all)")
    p.add_argument("--train-run", help="a finished run folder: its training tokens/s and time, for scale")
    p.add_argument("--out", default=str(ROOT / "bench" / "eval_speed.md"))
    p.add_argument("--bf16", action="store_true",
                   help="also run finetune's path (tasks and drift KL) under bf16 autocast (eval.mixed_precision: "
                        "bf16) and count the examples that score differently from float32; its speed means something "
                        "only where the CPU has amx_bf16/avx512_bf16 or on a GPU")
    args = p.parse_args()

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import torch

    import finetune.measure.drift as drift_module
    from finetune.measure import prefix_sharing
    from finetune.measure.drift import (
        NEW_TOKENS,
        PROMPTS,
        kl_drift,
        sample_chat,
        sample_texts,
    )
    from finetune.measure.tasks import evaluate_tasks, load_tasks
    from finetune.model import load_model, output_layer
    from finetune.model_files import load_tokenizer
    from finetune.quiet import silence_lm_eval
    from finetune.recipe import load_recipe

    silence_lm_eval()
    recipe = load_recipe(args.recipe)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, None).eval()
    ev = recipe.eval
    kinds = {spec: load_tasks(spec)[1] for spec in ev.tasks + ev.target_tasks}
    choice = [s for s, t in kinds.items() if all(x.OUTPUT_TYPE == "multiple_choice" for x in t.values())]
    generation = [s for s in kinds if s not in choice]
    rows, notes = [], []
    common_prefix = prefix_sharing.MIN_PREFIX

    def row(part, path, items, tokens, seconds):
        rows.append({"part": part, "path": path, "items": items, "tokens": tokens, "seconds": round(seconds, 2),
                     "items_per_s": round(items / seconds, 2), "tokens_per_s": round(tokens / seconds, 1)})
        print(f"{part:<26} {path:<28} {items:>5} items {tokens:>7} tokens {seconds:7.1f} s", file=sys.stderr)

    # (name, batch size, eval.share_prefixes, whether a batch's common prefix runs once)
    lm_eval_8 = ("lm-eval HFLM, batch 8 (before)", 8, False, False)
    finetune_path = (f"finetune shared prefixes, batch {ev.batch_size}", ev.batch_size, True, True)
    paths = {
        # lm-eval's log-likelihood batches are dense prompt + option rows: their batch size changes little on a CPU,
        # so multiple choice is timed at batch 8, and in finetune's path without the common prefix (the path before).
        "multiple choice": [lm_eval_8, (f"finetune, each question's prompt once, batch {ev.batch_size}",
                                        ev.batch_size, True, False), finetune_path],
        "generation": [lm_eval_8, (f"lm-eval HFLM, batch {ev.batch_size}", ev.batch_size, False, False),
                       finetune_path],
    }
    bf16 = (f"finetune shared prefixes, batch {ev.batch_size}, bf16 autocast", ev.batch_size, True, True)
    for part, specs in (("multiple choice", choice), ("generation", generation)):
        if not specs:
            continue
        scored = {}
        for name, batch, share, common in paths[part] + ([bf16] if args.bf16 else []):
            prefix_sharing.MIN_PREFIX = common_prefix if common else 10 ** 9  # no prompt shares 10**9 tokens
            scores, seconds = timed(evaluate_tasks, model, tokenizer, specs, batch_size=batch, limit=args.limit,
                                    chat=ev.apply_chat_template, share_prefixes=share,
                                    autocast=torch.bfloat16 if name == bf16[0] else None)
            scored[name] = scores
            row(part, name, sum(len(scores[s].examples) for s in specs), sum(tokens_of(tokenizer, scores[s]) for s in specs),
                seconds)
        reference, ours = scored[lm_eval_8[0]], scored[finetune_path[0]]
        items = sum(len(reference[s].examples) for s in specs)
        changed = sum(reference[s].examples[k] != ours[s].examples[k] for s in specs for k in reference[s].examples)
        notes.append(f"{part}: {changed} of {items} examples score differently between lm-eval's path at batch 8 and "
                     f"finetune's ({'; '.join(f'{s}: {reference[s].value:.3f} vs {ours[s].value:.3f}' for s in specs)}).")
        if args.bf16:
            low = scored[bf16[0]]
            moved = sum(ours[s].examples[k] != low[s].examples[k] for s in specs for k in ours[s].examples)
            notes.append(f"{part}: {moved} of {items} examples score differently under bf16 autocast than in float32 "
                         f"({'; '.join(f'{s}: {ours[s].value:.3f} vs {low[s].value:.3f}' for s in specs)}).")
    drift_texts, drift_inputs = {}, {}  # per kind, for the tuned adapter's rows below
    class Multinomial(drift_module._Draw):
        """generate()'s own draw, torch.multinomial (an exponential variate per vocabulary entry, drawn by
        exponential_): how the texts were drawn up to 6374fb6."""

        def __call__(self, input_ids, scores):
            token = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
            return torch.full_like(scores, -float("inf")).scatter_(1, token, 0.0)

    @contextlib.contextmanager
    def sampling_before():
        """The base's sampling as it was: multinomial, and every prompt run whole (no system turn shared)."""
        draw, lead = drift_module._Draw, drift_module.with_shared_lead
        drift_module._Draw, drift_module.with_shared_lead = Multinomial, lambda *a, **k: None
        try:
            yield
        finally:
            drift_module._Draw, drift_module.with_shared_lead = draw, lead

    for kind, sample in (("text", sample_texts), ("chat", sample_chat)):
        prompts = PROMPTS[kind][:args.limit]  # all of them without --limit
        batch = drift_module.GENERATION_BATCH
        old = "multinomial, prompts whole"
        ways = [(f"20 prompts per batch, {old} (before)", 20, None, True),
                (f"{batch} prompts per batch", batch, None, False)]
        if args.bf16:  # the new path last, so the KL rows below measure the texts a bf16 evaluation draws
            ways += [(f"{batch} prompts per batch, {old}, bf16 autocast (6374fb6)", batch, torch.bfloat16, True),
                     (f"{batch} prompts per batch, bf16 autocast", batch, torch.bfloat16, False)]
        for name, rows_at_once, autocast, before in ways:
            drift_module.GENERATION_BATCH = rows_at_once
            with sampling_before() if before else contextlib.nullcontext():
                texts, s_sample = timed(sample, model, tokenizer, prompts, new_tokens=NEW_TOKENS, seed=0,
                                        autocast=autocast)
            row(f"drift sampling ({kind}, base)", f"finetune, {name}", len(prompts), len(prompts) * NEW_TOKENS,
                s_sample)
        drift_module.GENERATION_BATCH = batch
        batched = drift_module.TOKENS_PER_PASS
        passes = [("one text per pass (before)", 1, None), (f"finetune, {batched} tokens per pass", batched, None)]
        if args.bf16:
            passes.append((f"finetune, {batched} tokens per pass, bf16 autocast", batched, torch.bfloat16))
        for name, per_pass, autocast in passes:
            drift_module.TOKENS_PER_PASS = per_pass  # 1: every batch holds one text, as before batching
            drift, s_drift = timed(kl_drift, model, model, tokenizer, texts, max_length=ev.drift_max_length,
                                   special_tokens=kind != "chat", autocast=autocast)
            row(f"drift KL ({kind})", name, drift.texts, 2 * drift.tokens, s_drift)
        drift_module.TOKENS_PER_PASS = batched
        # A run's path: the base's head inputs computed once with its texts (cached), then only the tuned model runs.
        # The same tokens are counted as above (two models' distributions compared), so tokens/s compare.
        autocast = passes[-1][2]
        inputs, s_inputs = timed(drift_module.head_inputs, model, tokenizer, texts, max_length=ev.drift_max_length,
                                 special_tokens=kind != "chat", autocast=autocast)
        row(f"drift KL ({kind})", f"the base's head inputs, once (cached){', bf16 autocast' if autocast else ''}",
            len(texts), sum(len(i) for i in inputs if i is not None), s_inputs)
        drift, s_drift = timed(kl_drift, None, model, tokenizer, texts, max_length=ev.drift_max_length,
                               special_tokens=kind != "chat", autocast=autocast, base_inputs=inputs,
                               base_head=output_layer(model))
        row(f"drift KL ({kind})", f"finetune, {batched} tokens per pass, the base from its cached head inputs"
            f"{', bf16 autocast' if autocast else ''}", drift.texts, 2 * drift.tokens, s_drift)
        drift_texts[kind], drift_inputs[kind] = texts, inputs
    adapter = Path(args.train_run or "") / "final"
    if args.train_run and (adapter / "adapter_config.json").is_file():
        # A tuned LoRA model's evaluation as a run measures it (all tasks, both drift kinds from the base's cached
        # head inputs, one autocast region), with the adapter as peft runs it and merged into the weights.
        import peft

        from finetune.model import adapter_merged
        from finetune.precision import cast_once

        tuned = peft.PeftModel.from_pretrained(load_model(recipe.model, None), adapter).eval()
        autocast = torch.bfloat16 if args.bf16 else None
        scored = {}
        for name, merge in (("the adapter as peft runs it", False), ("the adapter merged into the weights", True)):
            name += ", bf16 autocast" if autocast else ""
            with adapter_merged(tuned) if merge else contextlib.nullcontext(), cast_once(autocast, tuned):
                scores, seconds = timed(evaluate_tasks, tuned, tokenizer, list(kinds), batch_size=ev.batch_size,
                                        limit=args.limit, chat=ev.apply_chat_template, share_prefixes=True,
                                        autocast=autocast)
                tokens = sum(tokens_of(tokenizer, score) for score in scores.values())
                for kind, texts in drift_texts.items():
                    drift, s_drift = timed(kl_drift, None, tuned, tokenizer, texts, max_length=ev.drift_max_length,
                                           special_tokens=kind != "chat", autocast=autocast,
                                           base_inputs=drift_inputs[kind], base_head=output_layer(tuned))
                    seconds, tokens = seconds + s_drift, tokens + 2 * drift.tokens
            scored[name] = scores
            row(f"tuned evaluation ({args.train_run})", name, sum(len(x.examples) for x in scores.values()), tokens,
                seconds)
        first, merged = scored.values()
        moved = sum(first[s].examples[k] != merged[s].examples[k] for s in first for k in first[s].examples)
        values = "; ".join(f"{s}: {first[s].value:.3f} vs {merged[s].value:.3f}" for s in first)
        notes.append(f"tuned evaluation: {moved} of {sum(len(x.examples) for x in first.values())} examples score "
                     f"differently with the adapter merged ({values}).")
    train = {}
    if args.train_run:
        lines = [json.loads(x) for x in (Path(args.train_run) / "metrics.jsonl").read_text().splitlines() if x]
        steps = [x for x in lines if "tokens_per_s" in x]
        train = {"run": args.train_run, "updates": steps[-1]["step"], "tokens": steps[-1]["tokens"],
                 "tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in steps), 1)}
        train["seconds"] = round(train["tokens"] / train["tokens_per_s"], 1)
    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU flags: {cpu_flags()}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32"
              f"{' (and bf16 autocast where a row says so)' if args.bf16 else ''}; model {recipe.model.path}; "
              f"eval batch {ev.batch_size}, chat template {ev.apply_chat_template}, limit {args.limit or 'none'}.")
    table = ["| part | path | items | tokens | seconds | items/s | tokens/s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['part']} | {r['path']} | {r['items']} | {r['tokens']:,} | {r['seconds']} | {r['items_per_s']} | "
              f"{r['tokens_per_s']:,} |" for r in rows]
    if train:
        table.append(f"| training ({train['run']}) | finetune train | {train['updates']} updates | "
                     f"{train['tokens']:,} | {train['seconds']} | - | {train['tokens_per_s']:,} |")
    text = "\n".join([header, "", *table, "", *notes]) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows, "train": train,
                                                               "notes": notes}, indent=1) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
