"""L2-SP and EWC with LoRA, end to end: the penalty `finetune train` logs is lambda * ||scale * B @ A||^2 (weighted
by the base model's Fisher for EWC), recomputed here from the saved adapters, with peft's scaling (rsLoRA too)."""

import json
import math

import pytest
import torch
from conftest import make_recipe, metrics, run, text_rows, write_jsonl
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.data import IGNORE
from finetune.mitigations.l2sp import fisher_batches
from finetune.model_files import load_tokenizer
from finetune.recipe import load_recipe

LAMBDA = 0.5
# alpha != r, so a missing scale shows; with rsLoRA the scale is alpha / sqrt(r) = 4, not alpha / r = 2.
CASES = {
    "l2sp-lora": ({"r": 4, "alpha": 8}, False),
    "l2sp-rslora": ({"r": 4, "alpha": 8, "use_rslora": True}, False),
    "ewc-rslora": ({"r": 4, "alpha": 8, "use_rslora": True}, True),
}


def base_weight_name(lora_a_key: str) -> str:
    """`base_model.model.X.lora_A.default.weight` (a saved adapter's key) -> `X.weight` (the base model's)."""
    return lora_a_key.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight") + ".weight"


def fisher_in_plain_torch(model_dir, batches, names: list[str]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the base weights `names`: the mean over one-example batches of the squared
    gradient of the example's mean target-token cross-entropy, scaled to mean 1 over all of them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    for batch in batches:
        inputs = dict(batch)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            fisher[n] += g ** 2
    mean = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    return {n: f / mean for n, f in fisher.items()}


@pytest.mark.parametrize("case", CASES)
def test_logged_penalty_is_lambda_times_the_saved_adapters_scaled_update(tmp_path, tiny_model, case):
    lora, ewc = CASES[case]
    train = {"max_steps": 3, "lr": 1e-2, "l2sp": LAMBDA}
    if ewc:
        original = write_jsonl(tmp_path / "original.jsonl", text_rows(8))
        train["l2sp_fisher"] = {"datasets": [{"path": str(original), "format": "text"}], "rows": 4}
    recipe = make_recipe(tmp_path, tiny_model, lora=lora, train=train, output={"save_every": 1, "keep": 5})
    run_dir, _ = run(recipe)

    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir / "final")
    scalings = [m.scaling["default"] for m in loaded.modules() if isinstance(m, LoraLayer)]
    assert scalings and all(s == pytest.approx(scale, rel=1e-12) for s in scalings)  # peft's own scaling

    logged = {m["step"]: m["l2sp"] for m in metrics(run_dir)}
    assert logged[1] == 0  # LoRA starts with B = 0: no update yet
    fisher = None
    for step in (1, 2):
        # The penalty of step k+1 is taken before its update, on the weights step k's checkpoint holds.
        adapter = load_file(run_dir / "checkpoints" / f"step-{step}" / "model.safetensors")
        layers = sorted(k for k in adapter if ".lora_A." in k)
        assert len(layers) == 14  # 7 linear layers in each of 2 blocks
        if ewc and fisher is None:
            parsed = load_recipe(recipe)
            batches = fisher_batches(parsed.train.l2sp_fisher, parsed.data, load_tokenizer(parsed.model),
                                     parsed.train.seed, "cpu")
            fisher = fisher_in_plain_torch(tiny_model, batches, [base_weight_name(k) for k in layers])
        expected = 0.0
        for a_key in layers:
            update = scale * adapter[a_key.replace(".lora_A.", ".lora_B.")] @ adapter[a_key]  # [out, in]
            weight = fisher[base_weight_name(a_key)] if ewc else 1.0
            expected += (weight * update ** 2).sum().item()
        assert expected > 0
        assert logged[step + 1] == pytest.approx(LAMBDA * expected, rel=1e-4), (step, logged, LAMBDA * expected)
