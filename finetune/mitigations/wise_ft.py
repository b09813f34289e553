"""WiSE-FT weight interpolation (`finetune interpolate`): theta(alpha) = (1 - alpha) * theta_base + alpha * theta_tuned,
measured at each alpha on the original and target tasks. For a LoRA run the adapter's scale is multiplied by alpha,
which is the same interpolation without a second copy of the weights.

    RUN/interpolation/alpha-0.5/forgetting/report.*   one report per alpha
    RUN/interpolation/compare.*                        the curve on the learning-forgetting plane
    RUN/interpolation/alpha-0.5/model/                 with --pick: the best alpha within budget, saved
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..measure.saved import open_saved
from ..model import load_model, lora_layers
from ..recipe import load_recipe
from ..reports.compare import compare_runs
from ..reports.report import build_report, provenance, write_report
from . import describe
from .wise_ft_end import scale_adapter


class InterpolationError(UserError):
    """A run that cannot be interpolated as asked."""


def set_alpha(model, alpha: float, is_adapter: bool, base: dict, tuned: dict) -> None:
    """Put the model at alpha. 0 and 1 are exact: the base's or the tuned model's own numbers."""
    if is_adapter:
        for layer, name in lora_layers(model):
            layer.scaling[name] = alpha * tuned[(id(layer), name)]
        return
    with torch.no_grad():
        for key, param in model.state_dict().items():
            param.copy_((1 - alpha) * base[key] + alpha * tuned[key])


def _snapshots(model, is_adapter: bool, recipe) -> tuple[dict, dict]:
    if is_adapter:
        return {}, {(id(layer), name): layer.scaling[name] for layer, name in lora_layers(model)}
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = load_model(recipe.model, None).to(next(model.parameters()).device).state_dict()
    if base.keys() != tuned.keys():
        raise InterpolationError("the tuned model's weights do not match its base model's; interpolation needs "
                                 "the same architecture.")
    return base, tuned


def interpolate(run_dir: Path, alphas: list[float], pick: bool) -> dict:
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise InterpolationError(f"{run_dir} is not a run folder (no recipe.yaml).")
    if any(not 0 <= a <= 1 for a in alphas):
        raise InterpolationError(f"alphas must lie in [0, 1], got {alphas}.")
    recipe = load_recipe(saved)
    if recipe.lora is not None and recipe.lora.use_dora:
        raise InterpolationError("interpolating a DoRA adapter is not supported: scaling it does not interpolate "
                                 "its weights (the magnitude vector renormalises them).")
    if not recipe.eval.tasks:
        raise InterpolationError(f"{saved} lists no eval.tasks: interpolation is measured on the original tasks.")
    out = run_dir / "interpolation"
    if out.exists():
        raise InterpolationError(f"{out} already exists; move it aside to interpolate again (nothing is "
                                 "overwritten).")
    fe, model, is_adapter = open_saved(recipe.model, run_dir, recipe.eval, recipe.data.chat_template)
    base, tuned = _snapshots(model, is_adapter, recipe)
    folders = []
    for alpha in alphas:
        set_alpha(model, alpha, is_adapter, base, tuned)
        point = fe.evaluate(model, step=None)
        folder = out / f"alpha-{alpha:g}"
        write_report(folder / "forgetting", build_report(
            fe.base, point, max_drop=recipe.eval.max_drop, curve=[], provenance=provenance(recipe, fe.precision),
            final_note=f"weights interpolated at alpha={alpha:g} between the base (0) and {run_dir / 'final'} (1)",
            method=_at_alpha(describe(recipe), alpha)))
        folders.append(folder)
    result = compare_runs(folders, out)
    if pick and result["recommended"] is not None:
        best = Path(result["recommended"])
        alpha = float(best.name.removeprefix("alpha-"))
        set_alpha(model, alpha, is_adapter, base, tuned)
        _save(model, fe.tokenizer, alpha, is_adapter, tuned, best / "model")
        result["picked"] = str(best / "model")
    return result


def _at_alpha(method: dict, alpha: float) -> dict:
    """The run's name in comparisons, at one alpha: a family of its own (its points differ in alpha, not rate)."""
    return {**method, "label": f"{method['label']}, WiSE-FT alpha {alpha:g}", "family": f"{method['family']}, WiSE-FT",
            "tag": f"alpha {alpha:g}", "order": alpha}


def _save(model, tokenizer, alpha: float, is_adapter: bool, tuned: dict, dest: Path) -> None:
    if is_adapter:
        # A standard adapter at this alpha: B carries the factor and the scale is back to the config's, so peft
        # loads the folder as it is.
        set_alpha(model, 1.0, True, {}, tuned)
        scale_adapter(model, alpha)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
