"""`finetune train|launch|check|preview|chat|eval|compare|report|interpolate|sweep|merge|plan|recipes|keys|env`:
parse the command line, call the stages, turn user mistakes into one paragraph and a non-zero exit code (`--debug`
shows the traceback). Heavy libraries are imported only by the command that needs them, after its arguments are
known to be good."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, quiet
from .errors import UserError, main_process, print_main
from .recipe import EvalSection, describe_keys, dump_recipe, load_recipe

EXIT_USER_ERROR = 2

EPILOG = """examples:
  finetune recipes                                         # the shipped recipes, launch configs and task suites
  finetune recipes copy tiny-lora                          # copy one (and the data it uses) here
  finetune check recipes/tiny-lora.yaml --print            # validate, print the resolved recipe
  finetune preview recipes/tiny-lora.yaml --rows 2         # the data as trained: trained tokens marked, packing
  finetune train recipes/tiny-lora.yaml
  finetune train recipes/tiny-lora.yaml train.lr=1e-4 lora.r=8 output.dir=runs/r8
  finetune train recipes/tiny-lora.yaml lora=null          # full fine-tuning
  finetune train recipes/tiny-lora.yaml train.max_steps=60 --accept-changes   # train a finished run on
  finetune launch --config_file launch/cpu_ddp.yaml train recipes/tiny-lora.yaml   # 2 processes (accelerate)
  finetune chat runs/tiny-lora                             # talk to the fine-tuned model
  finetune eval data/tiny-llama runs/tiny-lora --tasks data/tasks/general_knowledge.yaml
  finetune eval data/tiny-llama runs/tiny-lora --tasks data/tasks/general_knowledge.yaml --checkpoints   # the curve
  finetune report runs/demo-lora runs/demo-full --out runs/compare   # runs with a forgetting report
  finetune compare lm-eval/base lm-eval/tuned --max-drop 0.05   # two lm_eval --log_samples outputs, paired
  finetune interpolate runs/demo-full --alphas 0,0.5,1 --pick        # a run whose recipe lists eval.tasks
  finetune sweep recipes/tiny-lora.yaml --grid train.lr=1e-3,3e-3 lora.r=4,16 lora=null --print-commands
  finetune merge runs/tiny-lora runs/tiny-lora-merged      # fold the LoRA adapter into its base
  finetune plan recipes/llama3.1-8b-lora-alpaca.yaml --launch-config launch/fsdp.yaml   # will it fit? (offline)
  finetune keys                                            # every recipe key, default and meaning
  finetune env                                             # versions and devices, for bug reports
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained language models and measure "
                                "what they forgot.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"finetune {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' own output (progress bars, warnings, lm-eval's logs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model as a recipe says (resumes an existing run folder)")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 lora=null")
    t.add_argument("--accept-changes", action="store_true",
                   help="resume a run folder even though the recipe changed in keys that change the result; with a "
                        "larger train.max_steps, train a finished run on from its last checkpoint")
    t.add_argument("--new-run", action="store_true",
                   help="if output.dir holds a run, start over in the next free folder (dir-2, dir-3, ...); "
                        "a single process only: under a launch, set output.dir instead")

    sub.add_parser("launch", add_help=False,
                   help="start a command on the processes an accelerate config asks for: `finetune launch "
                        "[accelerate launch options] train RECIPE`; refused before start when it cannot work here "
                        "(finetune launch --help)")

    c = sub.add_parser("check", help="validate a recipe, the model path, the output folder and the data's first rows, "
                                     "without loading the model")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--print", action="store_true", help="print the resolved recipe (every default filled in)")

    v = sub.add_parser("preview", help="show training examples as trained (trained tokens marked) and packing "
                                       "statistics")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--rows", type=int, default=3, help="examples to show (default %(default)s)")

    h = sub.add_parser("chat", help="talk to a fine-tuned model (adapter or full) through its chat template; reads "
                                    "one turn per line when stdin is not a terminal")
    h.add_argument("run", type=Path, help="a run folder, its final/, or any adapter or model folder")
    h.add_argument("--base", help="the base model for an adapter (default: the run's model.path)")
    h.add_argument("--system", help="a system message to start the conversation with")
    h.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default %(default)s)")
    h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampled")

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save a standalone model")
    m.add_argument("adapter", help="a LoRA run folder or its final/ (or any peft adapter folder)")
    m.add_argument("out", help="new folder for the merged model (must not exist or be empty)")

    e = sub.add_parser("eval", help="measure what a saved model forgot against its base; writes a report")
    e.add_argument("base", help="the base model: hub id, local folder or .gguf file")
    e.add_argument("tuned", help="a run folder (its final/), an adapter folder or a full model folder")
    e.add_argument("--tasks", nargs="+", help="original tasks (default: the run's recipe eval.tasks)")
    e.add_argument("--target-tasks", nargs="+", help="tasks of the new skill (default: the run's recipe)")
    e.add_argument("--limit", type=int, help="examples per task (default: all)")
    e.add_argument("--backend", choices=["hf", "vllm"], help="what scores the tasks (default: the run's recipe "
                   "eval.backend, else hf): vllm = lm-eval's vLLM model, on CUDA GPUs")
    e.add_argument("--mixed-precision", choices=["auto", "no", "bf16"],
                   help="precision of the evaluation's forward passes (default: the run's recipe "
                   "eval.mixed_precision, else auto: bf16 where the hardware computes in it); the base is measured "
                   "again in the precision chosen")
    e.add_argument("--checkpoints", action="store_true",
                   help="also measure every checkpoint a finished run kept: the learning-forgetting curve over steps")
    e.add_argument("--out", type=Path, help="new report folder (default: TUNED/forgetting for a run folder, "
                                             "./forgetting for any other folder; the next free forgetting-2, -3, "
                                             "... beside it when that one holds files)")

    r = sub.add_parser("report", help="compare runs: one table and the learning-forgetting plane")
    r.add_argument("runs", nargs="+", type=Path, help="run folders that hold forgetting/report.json")
    r.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.{md,json,html}")

    co = sub.add_parser("compare", help="forgetting verdict for two models lm-eval scored (`lm_eval ... "
                                        "--log_samples --output_path DIR`): the same paired report, no torch needed")
    co.add_argument("base", type=Path, help="the base model's lm-eval output: --output_path's folder, the model "
                                            "folder in it, or its results_<date>.json")
    co.add_argument("tuned", type=Path, help="the tuned model's, the same way")
    co.add_argument("--max-drop", type=float, default=EvalSection().max_drop,
                    help="budget: the largest drop allowed on each original task (default: eval.max_drop's, "
                         "%(default)g)")
    co.add_argument("--tasks", nargs="+", help="original tasks (default: every task and group of the base's run "
                                               "but the target tasks)")
    co.add_argument("--target-tasks", nargs="+", default=[], help="tasks of the new skill (gains, not a budget)")
    co.add_argument("--out", type=Path, help="new report folder (default: ./forgetting-lm-eval, or the next free "
                                             "-2, -3, ... when that one holds files)")

    i = sub.add_parser("interpolate", help="WiSE-FT: measure (1-a)*base + a*tuned at several a; pick the best")
    i.add_argument("run", type=Path, help="a finished run folder whose recipe lists eval.tasks")
    i.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated, in [0, 1] (default %(default)s)")
    i.add_argument("--pick", action="store_true",
                   help="save the model at the best alpha within the forgetting budget (eval.max_drop)")

    s = sub.add_parser("sweep", help="run a grid of recipe variants, then compare them on the learning-forgetting "
                                     "plane")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="section.key=value applied to every run (anywhere on the line)")
    s.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="values to sweep, e.g. train.lr=1e-5,1e-4,1e-3 lora.r=8,64 lora=null: every combination "
                        "is a run; lora=null adds full fine-tuning beside the LoRA variants (lora.* values apply to "
                        "those only); a key with one value applies to every run")
    s.add_argument("--launch-config", help="accelerate config to launch each run with (default: one process)")
    s.add_argument("--print-commands", action="store_true",
                   help="print one command per run (to submit on a cluster) instead of running them")
    s.add_argument("--prune", action="store_true",
                   help="run the grid as an Optuna study and stop a run whose forecast (after its first 10%% of "
                        "updates, and again after later probes) is FAIL beyond doubt (calibrated on "
                        "eval.forecast_calibration and the sweep's finished runs); a pruned run is measured where it "
                        "stopped and marked on the plane")
    s.add_argument("--storage", metavar="URL_OR_FILE",
                   help="with --prune: the study's Optuna storage (default: the journal file <sweep>/study.journal); "
                        "several workers given the same one share the grid, e.g. SLURM array tasks")

    pl = sub.add_parser("plan", help="memory per device and bytes sent per update, from the model's config alone "
                                     "(no weights loaded): will the recipe fit?")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="section.key=value, e.g. lora=null")
    pl.add_argument("--launch-config", type=Path, help="accelerate config the run will use (default: one device)")
    pl.add_argument("--processes", type=int, help="number of processes (default: the launch config's)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB",
                    help="memory of one device for the verdict (default %(default)g)")

    sub.add_parser("keys", help="print every recipe key with its default and meaning")
    rc = sub.add_parser("recipes", help="list the shipped recipes, launch configs and task suites; `recipes copy "
                                        "NAME [DEST]` copies one with the data it uses")
    rc.add_argument("action", nargs="*", metavar="copy NAME [DEST]")
    en = sub.add_parser("env", help="versions, devices and accelerate config, for bug reports")
    en.add_argument("--lock", action="store_true", help="only how the installed versions compare with requirements.lock")
    return p


def _eval(args) -> int:
    from .measure.saved import eval_command

    report, out = eval_command(Path(args.tuned), args.base, tasks=args.tasks, target_tasks=args.target_tasks,
                               limit=args.limit, out=args.out, checkpoints=args.checkpoints, backend=args.backend,
                               mixed_precision=args.mixed_precision)
    print(f"{report['verdict']['text']}\nreport: {out / 'report.html'}")
    return 0


def _train(args) -> int:
    from .checkpoint import open_run_dir
    from .startup import skip_bitsandbytes

    recipe = load_recipe(args.recipe, args.overrides)
    skip_bitsandbytes(recipe.model.quantization is not None)
    run = open_run_dir(recipe, args.accept_changes, new_run=args.new_run)
    if run.finished and not run.extending:
        print_main(f"{run.path} already holds a finished run ({run.final}); nothing to do. Use --new-run to train "
                   "again in a new folder, or raise train.max_steps with --accept-changes to train it on.")
        return 0
    from .preflight import check, check_tokens

    print_main(run.note, *check(recipe), file=sys.stderr)  # before torch is imported: a slip costs a second
    quiet.libraries()
    from .engine import check_launch
    from .model_files import load_tokenizer

    check_launch()
    # The first rows are encoded with the model's tokenizer before the model itself loads: a data mistake costs
    # seconds, not a model load.
    check_tokens(recipe, load_tokenizer(recipe.model, recipe.data.chat_template))
    from .preemption import EXIT_PREEMPTED, Preempted
    from .train import train  # heavy imports only once the recipe is known to be good

    try:
        train(recipe, run)
    except Preempted as stop:
        print_main(str(stop), file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _check(args) -> int:
    from .preflight import check, check_tokens, tokenizer_at_hand

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check(recipe)
    quiet.libraries()
    tokenizer, why_not = tokenizer_at_hand(recipe)
    if tokenizer is not None:
        check_tokens(recipe, tokenizer)
    if args.print:
        print(dump_recipe(recipe), end="")
    for note in [*notes, why_not]:
        if note:
            print(f"note: {note}", file=sys.stderr)
    from .mitigations import method_kind  # torch is loaded by now (the tokenizer check)

    method = method_kind(recipe).replace("full", "full fine-tuning")
    print(f"{args.recipe}: ok ({method}, {len(recipe.data.train)} training dataset(s), output {recipe.output.dir})",
          file=sys.stderr if args.print else sys.stdout)
    return 0


def _recipes(args) -> int:
    from . import shipped

    if not args.action:
        print(shipped.listing())
        return 0
    if args.action[0] != "copy" or len(args.action) not in (2, 3):
        raise UserError(f"`finetune recipes {' '.join(args.action)}`: use `finetune recipes` to list, or "
                        "`finetune recipes copy NAME [DEST]` to copy one.")
    written = shipped.copy(args.action[1], Path(args.action[2] if len(args.action) == 3 else "."))
    print(f"copied {written[0]}" + (f" and {len(written) - 1} file(s) of data it uses" if len(written) > 1 else ""))
    hint = shipped.model_hint(written[0]) if written[0].parent.name == "recipes" else ""
    if hint:
        print(hint)
    return 0


def _compare(args) -> int:
    from .reports.lm_eval_logs import compare_logs

    if not 0 <= args.max_drop < 1:
        raise UserError(f"--max-drop is {args.max_drop}; it is a share of the metric's range, in [0, 1) (0.05 = 5 "
                        "points).")
    report, out, compared = compare_logs(args.base, args.tuned, max_drop=args.max_drop, tasks=args.tasks,
                                         target_tasks=args.target_tasks, out=args.out)
    for item in compared.not_compared:
        print(f"not compared: {item} is not 0 or 1 per example (finetune's paired tests need 0/1 scores)")
    for task, z in compared.unpaired.items():
        print(f"for reference, lm-eval's unpaired z-test on {task}: {z['base']:.3f} -> {z['tuned']:.3f}, "
              f"p = {z['p']:.3f}")
    print(f"{report['verdict']['text']}\nreport: {out / 'report.html'}")
    return 0


def _report(args) -> int:
    from .reports.compare import compare_runs, summary_table

    result = compare_runs(args.runs, args.out)
    print(summary_table(result))
    print()
    for family, best in result["best_per_family"].items():
        print(f"best run within budget, {family}: {best or 'none passes'}")
    for note in result["notes"] + [c["text"] for c in result["method_comparison"]]:
        print(note)
    print(f"comparison of {len(args.runs)} runs: {args.out / 'compare.html'}")
    return 0


def _interpolate(args) -> int:
    quiet.libraries()
    from .mitigations.wise_ft import interpolate

    alphas = [float(a) for a in args.alphas.split(",")]
    result = interpolate(args.run, alphas, args.pick)
    print(f"interpolation curve: {args.run / 'interpolation' / 'compare.html'}; best alpha within budget: "
          f"{Path(result['recommended']).name if result['recommended'] else 'none'}"
          + (f"; saved to {result['picked']}" if result.get("picked") else ""))
    return 0


def _sweep(args) -> int:
    from .reports.compare import cut_text, part_trained
    from .sweep import sweep

    if args.storage and not args.prune:
        raise UserError("--storage is the pruning study's storage: it needs --prune.")
    result = sweep(Path(args.recipe), args.grid, args.overrides, args.launch_config, args.print_commands,
                   args.prune, args.storage)
    if result is not None:
        cut = [f"{r['name']} ({cut_text(r)})" for r in result["runs"] if part_trained(r)]
        if cut:
            print(f"ended on their forecast, measured where they stopped: {', '.join(cut)}")
        print(f"recommended run: {result['recommended'] or 'none passes the forgetting budget'}")
    return 0


def _merge(args) -> int:
    from .checkpoint import merge_source

    merge_source(Path(args.adapter), Path(args.out))  # a wrong folder is refused in a second, before torch loads
    quiet.libraries()
    from .model import merge_adapter, quantized_base

    out = merge_adapter(args.adapter, args.out)
    print(f"merged model written to {out}")
    quantized = quantized_base(args.adapter)
    if quantized:
        print(f"note: this adapter was trained on a {quantized['bits']}-bit ({quantized['type']}) base (QLoRA); it was "
              "merged into the unquantized base weights (float32), so the merged model is not exactly the one "
              f"trained, whose base weights were their 4-bit rounding. Evaluate it before use: finetune eval BASE {out}")
    return 0


def _plan(args) -> int:
    from .plan import plan, read_launch

    recipe = load_recipe(args.recipe, args.overrides)
    print(plan(recipe, read_launch(args.launch_config, args.processes), args.gpu_memory))
    return 0


def _preview(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    quiet.libraries()
    from .preview import preview

    print(preview(recipe, args.rows, color=sys.stdout.isatty()))
    return 0


def _chat(args) -> int:
    quiet.libraries()
    from .chat import chat

    return chat(args.run, base=args.base, system=args.system, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature)


def _keys(args) -> int:
    print(describe_keys())
    return 0


def _env(args) -> int:
    from .env import lock_status, report

    print("\n".join(lock_status()) if args.lock else report())
    return 0


COMMANDS = {"train": _train, "check": _check, "preview": _preview, "chat": _chat, "eval": _eval, "compare": _compare,
            "report": _report, "interpolate": _interpolate, "sweep": _sweep, "merge": _merge, "plan": _plan,
            "keys": _keys, "recipes": _recipes, "env": _env}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # key=value after an option (--print, sweep's --grid): argparse only takes them before
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = 0
    while flags < len(argv) and argv[flags] in ("--debug", "--verbose"):
        flags += 1
    if argv[flags:flags + 1] == ["launch"]:  # its options are accelerate's: argparse here would take them for ours
        return _launch(argv[:flags], argv[flags + 1:])
    parser = _parser()
    args = _parse(parser, argv)
    return _guarded(lambda: COMMANDS[args.command](args), args.debug, args.verbose)


def _launch(flags: list[str], rest: list[str]) -> int:
    from . import launch

    if not rest or rest[0] in ("-h", "--help"):
        print(launch.USAGE, end="", file=sys.stdout if rest else sys.stderr)
        return 0 if rest else EXIT_USER_ERROR
    verbose = "--verbose" in flags

    def start() -> int:
        accelerate_args, finetune_args = launch.split(rest, set(COMMANDS))
        if "--debug" in accelerate_args:  # accelerate's: its launcher then prints the failure and exits 0
            raise UserError("`--debug` after `launch` is accelerate's, which reports a failed launch with exit "
                            "status 0. For tracebacks put it before: finetune --debug launch ...")
        args = _parse(_parser(), finetune_args)
        if args.command == "train":  # a recipe's mistake is found here once, in a second, not by every rank
            from .preflight import check

            check(load_recipe(args.recipe, args.overrides))
        return launch.run(accelerate_args, flags + finetune_args, verbose)

    return _guarded(start, "--debug" in flags, verbose)


def _guarded(command, debug: bool, verbose: bool) -> int:
    """Run a command; a user's mistake becomes one `error:` line and exit status 2 (a traceback with --debug)."""
    from . import hub

    if verbose:
        os.environ["FINETUNE_VERBOSE"] = "1"  # for the processes a sweep or a launch starts
    quiet.configure(verbose)
    try:
        return command()
    except BrokenPipeError:
        # The reader of the output went away (`finetune report ... | head`): stop quietly, as other tools do, with
        # stdout pointed at /dev/null so that Python's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if debug:
            raise
        if isinstance(e, (UserError, FileExistsError)):
            message = str(e)
        elif hub.is_network_error(e):
            message = hub.describe_network_error(e)
        else:
            raise
        # Every process of a launch meets the same mistake: the main one says it, once. Each process writes its own
        # torchrun error file, so that a mistake met on another rank only (a file missing on another node, a hub
        # request that timed out there) is still named in the summary of the failed launch.
        if main_process():
            print(f"error: {message}", file=sys.stderr)
        _tell_torchrun(message)
        return EXIT_USER_ERROR


def _tell_torchrun(message: str) -> None:
    """Under torchrun (accelerate launch), its summary of the failed launch shows this message for this rank (the
    first rank to fail as the root cause), instead of a pointer to how to get a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        record = {"message": f"error: {message}", "extraInfo": {"py_callstack": f"error: {message}",
                                                                "timestamp": str(int(time.time()))}}
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": record}, f)
