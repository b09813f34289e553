"""Saved models measured against their base: `finetune eval` on a run's final/ or a model folder, every checkpoint
of a finished run (`--checkpoints`), and the start that `finetune interpolate` and `finetune chat` share."""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint import final_folder
from ..errors import print_main
from ..files import read_jsonl
from ..model import load_model
from ..model_files import load_tokenizer
from ..recipe import EvalSection, ModelSection, Recipe
from ..reports.report import build_report, provenance, write_report
from .evaluate import ForgettingEval, eval_device
from .lm_eval_samples import write_lm_eval_logs
from .tasks import EvalError


def load_tuned(base: ModelSection, folder: Path):
    """A saved model to measure, on the device evaluation runs on: a peft adapter folder (on `base`) or a full model
    folder; a run folder means its final/. Returns (model, whether it is an adapter)."""
    import peft

    folder = final_folder(folder)
    if (folder / "adapter_config.json").is_file():
        model, is_adapter = peft.PeftModel.from_pretrained(load_model(base, None), folder), True
    elif (folder / "config.json").is_file():
        model = load_model(ModelSection(path=str(folder), dtype=base.dtype, cache_dir=base.cache_dir), None)
        is_adapter = False
    else:
        raise EvalError(f"{folder} holds neither a peft adapter (adapter_config.json) nor a model (config.json).")
    return model.to(eval_device()), is_adapter


def open_saved(base: ModelSection, tuned: Path, section: EvalSection, chat_template: str | None):
    """(ForgettingEval with the base measured, tuned model, whether it is an adapter): how `finetune eval` and
    `finetune interpolate` both start. For an adapter, one copy of the base serves both (its adapter switched off
    for the base); for a full model a second copy is loaded only if the cache lacks the base's scores."""
    fe = ForgettingEval(section, base, load_tokenizer(base, chat_template))
    model, is_adapter = load_tuned(base, Path(tuned))
    fe.evaluate_base(model if is_adapter else None)
    return fe, model, is_adapter


def evaluate_saved(base: ModelSection, tuned: Path, section: EvalSection, out_dir: Path, *,
                   recipe: Recipe | None = None, final_note: str = "", method: dict | None = None) -> dict:
    """`finetune eval BASE RUN_OR_MODEL`: measure a saved model against its base, write the report to `out_dir`
    and return it. The tokenizer carries the run recipe's chat template, as in training."""
    fe, model, _ = open_saved(base, tuned, section, recipe.data.chat_template if recipe else None)
    tuned_eval = fe.evaluate(model, step=None)
    report = build_report(fe.base, tuned_eval, max_drop=section.max_drop, curve=[],
                          provenance=provenance(recipe, fe.precision), final_note=final_note or f"{tuned} as saved",
                          method=method)
    write_report(out_dir, report)
    _write_samples(out_dir, fe, tuned_eval, base.path, str(tuned), section)
    return report


def _write_samples(out_dir: Path, fe: ForgettingEval, tuned_eval, base_name: str, tuned_name: str,
                   section: EvalSection) -> None:
    """Both models' per-example results in lm-eval's layout, beside the report (out_dir/lm-eval/base, .../tuned)."""
    for line in write_lm_eval_logs(out_dir / "lm-eval", {"base": fe.base, "tuned": tuned_eval},
                                   {"base": base_name, "tuned": tuned_name}, chat=section.apply_chat_template,
                                   limit=section.limit):
        print(f"note: {line}", file=sys.stderr)


def _load_checkpoint_weights(model, checkpoint: Path) -> None:
    """A checkpoint's weights (the adapter, for LoRA) into `model`, built as the run built it. Weights tied to
    others (the LM head to the embeddings) may be saved once."""
    from safetensors.torch import load_file

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise EvalError(f"{checkpoint} holds no model.safetensors (a sharded FSDP or DeepSpeed checkpoint?); only "
                        "checkpoints of one-process and DDP runs can be evaluated one by one.")
    state = load_file(path, device=str(eval_device()))
    result = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters())
    untied = [k for k in result.missing_keys if k in params and params[k].requires_grad
              and params[k].data_ptr() not in loaded]
    if result.unexpected_keys or untied:
        raise EvalError(f"{checkpoint} does not match the run's model (missing {untied[:3]}, unexpected "
                        f"{result.unexpected_keys[:3]}).")


def evaluate_checkpoints(run: Path, recipe: Recipe, section: EvalSection, out_dir: Path, *, method: dict) -> dict:
    """`finetune eval BASE RUN --checkpoints`: every checkpoint a finished run kept, then its final/, as the curve
    that `eval.every` would have drawn during training, without training again. Writes the report to `out_dir`."""
    from ..checkpoint import checkpoint_step, complete_checkpoints

    if not (run / "final").is_dir():
        raise EvalError(f"{run} has no final/: --checkpoints measures a finished run.")
    fe = ForgettingEval(section, recipe.model, load_tokenizer(recipe.model, recipe.data.chat_template))
    model = load_model(recipe.model, recipe.lora).to(eval_device())  # a fresh adapter is the base (B = 0)
    fe.evaluate_base(model if recipe.lora else None)
    for checkpoint in complete_checkpoints(run / "checkpoints"):
        _load_checkpoint_weights(model, checkpoint)
        fe.evaluate(model, checkpoint_step(checkpoint))
    del model
    final, _ = load_tuned(recipe.model, run)
    logged = read_jsonl(run / "metrics.jsonl")
    last = fe.evaluate(final, logged[-1]["step"] if logged else None)
    report = build_report(fe.base, last, max_drop=section.max_drop, curve=fe.curve,
                          provenance=provenance(recipe, fe.precision),
                          final_note=f"{run / 'final'}, after step {last.step}; the curve adds every checkpoint the "
                                     "run kept", method=method)
    write_report(out_dir, report)
    _write_samples(out_dir, fe, last, recipe.model.path, str(run / "final"), section)
    return report


def eval_command(tuned: Path, base_path: str, *, tasks: list[str] | None, target_tasks: list[str] | None,
                 limit: int | None, out: Path | None, checkpoints: bool,
                 backend: str | None = None, mixed_precision: str | None = None) -> tuple[dict, Path]:
    """`finetune eval BASE TUNED`: the tasks are the run's recipe's (TUNED/recipe.yaml) unless given; the report goes
    to `out`, else to the run's forgetting/ (its own report, if any, kept: the next free sibling), else to
    ./forgetting. A run's model card then carries the new verdict. Returns (report, the folder written)."""
    import dataclasses

    from ..card import refresh_model_card
    from ..checkpoint import RunDir
    from ..files import report_dir
    from ..mitigations import describe
    from ..preflight import check_sources
    from ..quiet import libraries
    from ..recipe import load_recipe

    saved = tuned / "recipe.yaml"
    recipe = load_recipe(saved) if saved.is_file() else None
    section = recipe.eval if recipe else EvalSection()
    changes = {k: v for k, v in (("tasks", tasks), ("target_tasks", target_tasks), ("limit", limit),
                                 ("backend", backend), ("mixed_precision", mixed_precision)) if v is not None}
    section = dataclasses.replace(section, **changes)
    if not section.tasks and not section.target_tasks:
        raise EvalError("no tasks to evaluate: pass --tasks (and --target-tasks), or a run whose recipe lists "
                        "eval.tasks.")
    if checkpoints and recipe is None:
        raise EvalError(f"--checkpoints needs a run folder (one with recipe.yaml); {tuned} is not one.")
    base = dataclasses.replace(recipe.model, path=base_path) if recipe else ModelSection(path=base_path)
    print_main(*check_sources(base, section), file=sys.stderr)
    libraries()
    # A run's own report, if any, stays as training wrote it.
    chosen = report_dir(out, tuned / "forgetting" if tuned.is_dir() and recipe else Path("forgetting"))
    if checkpoints:
        report = evaluate_checkpoints(tuned, dataclasses.replace(recipe, model=base), section, chosen,
                                      method=describe(recipe))
    else:
        report = evaluate_saved(base, tuned, section, chosen, recipe=recipe,
                                method=describe(recipe) if recipe else None)
    if recipe is not None and chosen == tuned / "forgetting":
        refresh_model_card(recipe, RunDir(tuned, None, True))  # the run's card now carries this verdict
    return report, chosen
