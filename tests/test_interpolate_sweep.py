"""WiSE-FT interpolation is exact at its ends; a sweep's comparison marks the right Pareto front and pick."""

import json
import subprocess
import sys

import peft
import pytest
import torch
from conftest import conflicting_recipe, make_recipe, run, weights
from transformers import AutoModelForCausalLM

from finetune.cli import main as cli_main
from finetune.mitigations.wise_ft import _snapshots, set_alpha
from finetune.sweep import parse_grid, plan

IDS = torch.tensor([[3, 7, 11, 19, 23, 29]])


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_full_interpolation_is_the_base_at_0_and_the_tuned_model_at_1(tiny_model):
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    base_state = base.state_dict()
    set_alpha(model, 0.0, False, base_state, tuned)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    set_alpha(model, 1.0, False, base_state, tuned)
    assert all(torch.equal(v, tuned[k]) for k, v in model.state_dict().items())
    set_alpha(model, 0.5, False, base_state, tuned)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(model.state_dict()[k], (base_state[k] + tuned[k]) / 2)


def test_lora_interpolation_scales_the_adapter_exactly(tiny_model):
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny_model))
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    tuned_logits = logits(model)
    _, scales = _snapshots(model, True, None)
    set_alpha(model, 0.0, True, {}, scales)
    assert torch.equal(logits(model), base_logits)
    set_alpha(model, 1.0, True, {}, scales)
    assert torch.equal(logits(model), tuned_logits)


def test_interpolate_command_measures_each_alpha_and_picks_within_budget(tmp_path, base_dir, tasks):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks, max_drop=0.3)
    run_dir, _ = run(recipe, "lora.r=4", "lora.alpha=8", "train.lr=1e-2")
    assert cli_main(["interpolate", str(run_dir), "--alphas", "0,0.5,1", "--pick"]) == 0
    out = run_dir / "interpolation"
    at = {a: json.loads((out / f"alpha-{a}" / "forgetting" / "report.json").read_text()) for a in ("0", "0.5", "1")}
    assert all(d["kl"] == 0.0 for d in at["0"]["drift"].values()) and at["0"]["tasks"]["original"]["delta"] == 0.0
    trained = json.loads((run_dir / "forgetting" / "report.json").read_text())
    assert at["1"]["tasks"]["original"]["tuned"] == trained["tasks"]["original"]["tuned"]
    compared = json.loads((out / "compare.json").read_text())
    assert [r["run"].rsplit("/", 1)[1] for r in compared["runs"]] == ["alpha-0", "alpha-0.5", "alpha-1"]
    pick = compared["recommended"]
    assert pick is not None and json.loads((out / pick.rsplit("/", 1)[1] / "forgetting" / "report.json")
                                           .read_text())["verdict"]["within_budget"]
    picked = out / pick.rsplit("/", 1)[1] / "model"
    assert (picked / "adapter_config.json").is_file()
    # The saved adapter, reloaded as peft loads any adapter, is the model at the picked alpha.
    alpha = float(pick.rsplit("-", 1)[1])
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), picked)
    at_alpha = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "final")
    _, scales = _snapshots(at_alpha, True, None)
    set_alpha(at_alpha, alpha, True, {}, scales)
    assert torch.allclose(logits(reloaded), logits(at_alpha), atol=1e-5)
    if alpha != 1.0:
        set_alpha(at_alpha, 1.0, True, {}, scales)
        assert not torch.allclose(logits(reloaded), logits(at_alpha), atol=1e-5)
    assert cli_main(["interpolate", str(run_dir)]) == 2  # never overwrites an earlier interpolation


def test_wise_ft_alpha_ends_training_at_the_interpolated_adapter_that_interpolate_would_measure(tmp_path, base_dir,
                                                                                                 tasks):
    """`lora.wise_ft_alpha` scales the trained adapter once, after the last update: final/ holds it (a standard
    adapter) and the run's own report measures it, with the scores `finetune interpolate` gives that run at alpha."""
    recipe = conflicting_recipe(tmp_path, base_dir, tasks, max_drop=0.3)
    lora = ["lora.r=4", "lora.alpha=8", "train.lr=1e-2"]
    plain, _ = run(recipe, *lora, f"output.dir={tmp_path / 'plain'}")
    scaled, _ = run(recipe, *lora, "lora.wise_ft_alpha=0.5", f"output.dir={tmp_path / 'scaled'}")
    a, b = weights(plain), weights(scaled)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        assert torch.equal(b[key], a[key] * 0.5 if "lora_B" in key else a[key]), key
    assert cli_main(["interpolate", str(plain), "--alphas", "0.5"]) == 0
    measured = json.loads((plain / "interpolation" / "alpha-0.5" / "forgetting" / "report.json").read_text())
    report = json.loads((scaled / "forgetting" / "report.json").read_text())
    unscaled = json.loads((plain / "forgetting" / "report.json").read_text())
    for part in ("tasks", "targets"):
        name = next(iter(report[part]))
        assert report[part][name]["examples"] == measured[part][name]["examples"]
    assert report["drift"]["text"]["kl"] == pytest.approx(measured["drift"]["text"]["kl"], rel=1e-6)
    assert report["drift"]["text"]["kl"] != unscaled["drift"]["text"]["kl"]
    assert "WiSE-FT alpha 0.5" in report["method"]["label"] and "lora.wise_ft_alpha" in report["final"]["why"]


def test_wise_ft_alpha_is_refused_where_it_cannot_mean_an_interpolation(tmp_path, tiny_model):
    from finetune.recipe import RecipeError, load_recipe

    recipe = make_recipe(tmp_path, tiny_model, lora={"r": 4, "alpha": 8})
    for overrides, key in ((["lora.wise_ft_alpha=0"], "lora.wise_ft_alpha"),
                           (["lora.wise_ft_alpha=0.5", "lora.use_dora=true"], "lora.use_dora"),
                           (["lora.wise_ft_alpha=0.5", "eval.on_over_budget=keep_best"], "eval.on_over_budget")):
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe(recipe, overrides)
    # Under DeepSpeed, at set-up: before the run trains, not after.
    from finetune.engine import Engine
    from finetune.mitigations import Context, at_end
    from finetune.mitigations.wise_ft_end import WiseFTError

    scaled = load_recipe(recipe, ["lora.wise_ft_alpha=0.5"])
    with pytest.raises(WiseFTError, match="DeepSpeed"):
        at_end(scaled, Context(None, Engine("DEEPSPEED"), None, None))
    assert at_end(load_recipe(recipe), Context(None, Engine("DEEPSPEED"), None, None)) == []


def test_sweep_grid_parsing_and_plan(tmp_path, tiny_model):
    assert parse_grid(["train.lr=1e-5,1e-4", "lora=null,{r: 8, alpha: 16}"]) == [
        ("train.lr", ["1e-5", "1e-4"]), ("lora", ["null", "{r: 8, alpha: 16}"])]
    recipe = conflicting_recipe_path(tmp_path, tiny_model)
    root, runs = plan(recipe, parse_grid(["train.lr=1e-3,1e-2", "lora.r=2,4"]), [])
    assert len(runs) == 4 and len({out for out, _ in runs}) == 4
    assert all(str(out).startswith(str(root)) for out, _ in runs)


def conflicting_recipe_path(tmp_path, model):
    task = tmp_path / "t.yaml"
    task.write_text("task: t\n")
    return make_recipe(tmp_path, model, eval={"tasks": [str(task)]})


@pytest.mark.slow
def test_sweep_runs_every_combination_and_writes_one_comparison(tmp_path, base_dir, tasks):
    recipe = conflicting_recipe(tmp_path, base_dir, tasks)
    proc = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(recipe), "train.max_steps=6",
                           "--grid", "train.lr=1e-4,0.003"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compared = json.loads((tmp_path / "runs" / "r-sweep" / "compare" / "compare.json").read_text())
    assert len(compared["runs"]) == 2 and "recommended run:" in proc.stdout
    drops = {r["run"].rsplit("/", 1)[1]: r["drop"] for r in compared["runs"]}
    assert drops["lr=0.003"] > drops["lr=1e-4"]  # the higher learning rate forgets more
    # The same grid with --prune keeps the finished runs as its study's trials: none is trained again.
    pruning = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(recipe), "train.max_steps=6", "--grid",
                              "train.lr=1e-4,0.003", "--prune"], capture_output=True, text=True)
    assert pruning.returncode == 0, pruning.stderr[-3000:]
    assert pruning.stdout.count("finished before; kept") == 2 and "recommended run:" in pruning.stdout
