"""`finetune train|check|eval|report|interpolate|sweep|merge|keys`: parse the command line, call the stages, turn user
mistakes into one paragraph and a non-zero exit code (`--debug` shows the traceback). Heavy libraries are imported
only by the command that needs them, after its arguments are known to be good."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError
from .recipe import describe_keys, load_recipe

EXIT_USER_ERROR = 2

EPILOG = """examples:
  finetune train recipes/tiny-lora.yaml
  finetune train recipes/tiny-lora.yaml train.lr=1e-4 lora.r=8 output.dir=runs/r8
  finetune train recipes/tiny-lora.yaml lora=null          # full fine-tuning
  accelerate launch --config_file launch/cpu_ddp.yaml -m finetune train recipes/tiny-lora.yaml
  finetune eval data/tiny-llama runs/tiny-lora --tasks data/tasks/general_knowledge.yaml
  finetune report runs/tiny-lora runs/tiny-full --out runs/compare
  finetune interpolate runs/tiny-full --alphas 0,0.5,1 --pick
  finetune sweep recipes/tiny-lora.yaml --grid train.lr=1e-3,3e-3 lora.r=4,16
  finetune merge runs/tiny-lora/final runs/tiny-lora-merged
  finetune plan recipes/llama3.1-8b-lora-alpaca.yaml --launch-config launch/fsdp.yaml   # will it fit? (offline)
  finetune keys                                            # every recipe key, default and meaning
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained language models and measure "
                                "what they forgot.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model as a recipe says (resumes an existing run folder)")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 lora=null")
    t.add_argument("--accept-changes", action="store_true",
                   help="resume a run folder even though the recipe changed in keys that change the result")
    t.add_argument("--new-run", action="store_true",
                   help="if output.dir holds a run, start over in the next free folder (dir-2, dir-3, ...)")

    c = sub.add_parser("check", help="validate a recipe without loading anything")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save a standalone model")
    m.add_argument("adapter", help="a run's final/ folder (or any peft adapter folder)")
    m.add_argument("out", help="new folder for the merged model (must not exist or be empty)")

    e = sub.add_parser("eval", help="measure what a saved model forgot against its base; writes a report")
    e.add_argument("base", help="the base model: hub id, local folder or .gguf file")
    e.add_argument("tuned", help="a run folder (its final/), an adapter folder or a full model folder")
    e.add_argument("--tasks", nargs="+", help="original tasks (default: the run's recipe eval.tasks)")
    e.add_argument("--target-tasks", nargs="+", help="tasks of the new skill (default: the run's recipe)")
    e.add_argument("--limit", type=int, help="examples per task (default: all)")
    e.add_argument("--checkpoints", action="store_true",
                   help="also measure every checkpoint a finished run kept: the learning-forgetting curve over steps")
    e.add_argument("--out", type=Path, help="new report folder (default: TUNED/forgetting, or the next free "
                                             "forgetting-2, -3, ... beside it)")

    r = sub.add_parser("report", help="compare runs: one table and the learning-forgetting plane")
    r.add_argument("runs", nargs="+", type=Path, help="run folders that hold forgetting/report.json")
    r.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.{md,json,html}")

    i = sub.add_parser("interpolate", help="WiSE-FT: measure (1-a)*base + a*tuned at several a; pick the best")
    i.add_argument("run", type=Path, help="a finished run folder whose recipe lists eval.tasks")
    i.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated, in [0, 1] (default %(default)s)")
    i.add_argument("--pick", action="store_true",
                   help="save the model at the best alpha within the forgetting budget (eval.max_drop)")

    s = sub.add_parser("sweep", help="run a grid of recipe variants, then compare them on the learning-forgetting "
                                     "plane")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    s.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="values to sweep, e.g. train.lr=1e-5,1e-4,1e-3 lora.r=8,64 lora=null")
    s.add_argument("--launch-config", help="accelerate config to launch each run with (default: one process)")
    s.add_argument("--print-commands", action="store_true",
                   help="print one command per run (to submit on a cluster) instead of running them")

    pl = sub.add_parser("plan", help="memory per device and bytes sent per update, from the model's config alone "
                                     "(no weights loaded): will the recipe fit?")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="section.key=value, e.g. lora=null")
    pl.add_argument("--launch-config", type=Path, help="accelerate config the run will use (default: one device)")
    pl.add_argument("--processes", type=int, help="number of processes (default: the launch config's)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB",
                    help="memory of one device for the verdict (default %(default)g)")

    sub.add_parser("keys", help="print every recipe key with its default and meaning")
    return p


def _eval(args) -> int:
    import dataclasses

    from .checkpoint import next_free_dir
    from .evaluate import evaluate_saved
    from .recipe import EvalSection, ModelSection

    tuned = Path(args.tuned)
    saved = tuned / "recipe.yaml"
    recipe = load_recipe(saved) if saved.is_file() else None
    section = recipe.eval if recipe else EvalSection()
    changes = {k: v for k, v in (("tasks", args.tasks), ("target_tasks", args.target_tasks), ("limit", args.limit))
               if v is not None}
    section = dataclasses.replace(section, **changes)
    if not section.tasks and not section.target_tasks:
        print("error: no tasks to evaluate: pass --tasks (and --target-tasks), or a run whose recipe lists "
              "eval.tasks.", file=sys.stderr)
        return EXIT_USER_ERROR
    base = dataclasses.replace(recipe.model, path=args.base) if recipe else ModelSection(path=args.base)
    out = args.out or (tuned / "forgetting" if tuned.is_dir() and saved.is_file() else Path("forgetting"))
    if out.exists() and any(out.iterdir()):
        if args.out:
            print(f"error: {out} already holds files; nothing is overwritten. Choose another --out.", file=sys.stderr)
            return EXIT_USER_ERROR
        out = next_free_dir(out)  # the run's own report stays as training wrote it
    from .mitigations import describe

    if args.checkpoints:
        if recipe is None:
            print(f"error: --checkpoints needs a run folder (one with recipe.yaml); {tuned} is not one.",
                  file=sys.stderr)
            return EXIT_USER_ERROR
        from .evaluate import evaluate_checkpoints

        report = evaluate_checkpoints(tuned, dataclasses.replace(recipe, model=base), section, out,
                                      method=describe(recipe))
    else:
        report = evaluate_saved(base, tuned, section, out, recipe=recipe, method=describe(recipe) if recipe else None)
    print(f"{report['verdict']['text']}\nreport: {out / 'report.html'}")
    return 0


def _train(args) -> int:
    from .checkpoint import next_free_dir, open_run_dir

    recipe = load_recipe(args.recipe, args.overrides)
    if args.new_run and Path(recipe.output.dir).exists():
        recipe.output.dir = str(next_free_dir(Path(recipe.output.dir)))
    run = open_run_dir(recipe, args.accept_changes)
    if run.finished:
        print(f"{run.path} already holds a finished run ({run.final}); nothing to do. "
              "Use --new-run to train again in a new folder.")
        return 0
    from .preemption import EXIT_PREEMPTED, Preempted
    from .train import train  # heavy imports only once the recipe is known to be good

    try:
        train(recipe, run)
    except Preempted as stop:
        print(stop, file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "check":
            recipe = load_recipe(args.recipe, args.overrides)
            method = ("QLoRA" if recipe.model.quantization else "LoRA") + f" r={recipe.lora.r}" if recipe.lora else \
                "full fine-tuning"
            print(f"{args.recipe}: ok ({method}, "
                  f"{len(recipe.data.train)} training dataset(s), output {recipe.output.dir})")
            return 0
        if args.command == "eval":
            return _eval(args)
        if args.command == "plan":
            from .plan import plan, read_launch

            recipe = load_recipe(args.recipe, args.overrides)
            print(plan(recipe, read_launch(args.launch_config, args.processes), args.gpu_memory))
            return 0
        if args.command == "report":
            from .report import compare_runs, summary_table

            result = compare_runs(args.runs, args.out)
            print(summary_table(result))
            print()
            for family, best in result["best_per_family"].items():
                print(f"best run within budget, {family}: {best or 'none passes'}")
            for note in result["notes"] + [c["text"] for c in result["method_comparison"]]:
                print(note)
            print(f"comparison of {len(args.runs)} runs: {args.out / 'compare.html'}")
            return 0
        if args.command == "interpolate":
            from .mitigations.wise_ft import interpolate

            alphas = [float(a) for a in args.alphas.split(",")]
            result = interpolate(args.run, alphas, args.pick)
            print(f"interpolation curve: {args.run / 'interpolation' / 'compare.html'}; best alpha within budget: "
                  f"{Path(result['recommended']).name if result['recommended'] else 'none'}"
                  + (f"; saved to {result['picked']}" if result.get("picked") else ""))
            return 0
        if args.command == "sweep":
            from .sweep import sweep

            result = sweep(Path(args.recipe), args.grid, args.overrides, args.launch_config, args.print_commands)
            if result is not None:
                print(f"recommended run: {result['recommended'] or 'none passes the forgetting budget'}")
            return 0
        if args.command == "merge":
            from .model import merge_adapter, quantized_base

            out = merge_adapter(args.adapter, args.out)
            print(f"merged model written to {out}")
            quantized = quantized_base(args.adapter)
            if quantized:
                print(f"note: this adapter was trained on a {quantized['bits']}-bit ({quantized['type']}) base "
                      "(QLoRA); it was merged into the unquantized base weights (float32), so the merged model is "
                      "not exactly the one trained, whose base weights were their 4-bit rounding. Evaluate it "
                      f"before use: finetune eval BASE {out}")
            return 0
        print(describe_keys())
        return 0
    except Exception as e:
        if args.debug or not isinstance(e, (UserError, FileExistsError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR

