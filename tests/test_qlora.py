"""QLoRA: LoRA on a 4-bit base (bitsandbytes, which runs 4-bit on CPU too): recipe checks, training, reloading the
adapter on a 4-bit base, merging into the unquantized weights."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_recipe, metrics, run
from transformers import AutoModelForCausalLM

from finetune import cli
from finetune.card import model_card
from finetune.checkpoint import RunDir
from finetune.measure.saved import load_tuned
from finetune.mitigations import describe, method_label
from finetune.model import ModelError, count_parameters, load_model
from finetune.model_files import load_tokenizer
from finetune.recipe import LoraSection, ModelSection, QuantizationSection, RecipeError, load_recipe


QUANT = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def linear4bit_layers(model) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def packed_base(model) -> dict[str, torch.Tensor]:
    """The 4-bit weights by module name, without peft's prefixes."""
    return {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m.weight.detach().clone()
            for n, m in linear4bit_layers(model).items()}


def test_quantization_needs_lora_and_turns_checkpointing_on(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model, model={"quantization": QUANT}, lora={"r": 4})
    recipe = load_recipe(path)
    assert recipe.model.quantization == QuantizationSection(**QUANT)
    assert recipe.model.gradient_checkpointing is True  # on by default with quantization...
    assert load_recipe(path, ["model.gradient_checkpointing=false"]).model.gradient_checkpointing is False  # ...unless
    assert load_recipe(path, ["model.quantization=null"]).model.gradient_checkpointing is False  # off by default

    with pytest.raises(RecipeError, match=r"`model\.quantization`.*cannot be trained.*Add a `lora` section"):
        load_recipe(path, ["lora=null"])
    with pytest.raises(RecipeError, match=r"`model\.quantization\.bits` is 8; it must be one of 4"):
        load_recipe(path, ["model.quantization.bits=8"])
    with pytest.raises(RecipeError, match=r"unknown key `model\.quantization\.dtype`"):
        load_recipe(path, ["model.quantization.dtype=bfloat16"])
    fisher = f"train.l2sp_fisher={{datasets: [{{path: {tmp_path / 'chat.jsonl'}, format: chat}}]}}"
    with pytest.raises(RecipeError, match=r"`train\.l2sp_fisher` needs gradients of the base weights"):
        load_recipe(path, ["train.l2sp=0.1", fisher])


def test_qlora_is_named_qlora_by_reports_the_model_card_and_check(tmp_path, tiny_model, capsys):
    path = make_recipe(tmp_path, tiny_model, model={"quantization": QUANT}, lora={"r": 4})
    qlora, lora = load_recipe(path), load_recipe(path, ["model.quantization=null"])
    # Reports group runs by family: a QLoRA run is not drawn on the curve of LoRA runs at the same rank.
    assert describe(qlora)["family"] == "QLoRA r=4" and describe(lora)["family"] == "LoRA r=4"
    assert method_label(qlora) == "QLoRA r=4, lr 0.003"
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "adapter_config.json").write_text("{}")
    card = model_card(qlora, RunDir(run_dir, None, finished=True))
    assert "a QLoRA adapter (r 4" in card and "Comparisons call it `QLoRA r=4, lr 0.003`" in card
    assert "a LoRA adapter (r 4" in model_card(lora, RunDir(run_dir, None, finished=True))
    assert cli.main(["check", str(path)]) == 0
    assert "ok (QLoRA r=4," in capsys.readouterr().out


def test_quantized_loading_is_refused_where_it_cannot_run(tiny_model, monkeypatch):
    section = ModelSection(path=str(tiny_model), quantization=QuantizationSection())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ModelError, match=r"runs on one device or under DDP, not under FSDP"):
        load_model(section, LoraSection(r=4))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs bitsandbytes: pip install"):
        load_model(section, LoraSection(r=4))


def test_quantized_model_is_4bit_under_a_float32_adapter(tiny_model):
    plain = load_model(ModelSection(path=str(tiny_model)), None)
    model = load_model(ModelSection(path=str(tiny_model), dtype="bfloat16", quantization=QuantizationSection(),
                                    gradient_checkpointing=True), LoraSection(r=4))
    layers = linear4bit_layers(model)
    # Every linear layer of the decoder is 4-bit; the head stays as it was (transformers leaves it out).
    assert len(layers) == 7 * plain.config.num_hidden_layers
    assert all(m.weight.dtype == torch.uint8 for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # prepare_model_for_kbit_training: what is not 4-bit (embeddings, norms, head) is cast from bfloat16 to float32.
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.dtype != torch.uint8)
    assert model.base_model.model.is_activation_checkpointing
    # Parameters count as the weights they hold, not the bytes they are packed in.
    assert count_parameters(model)[1] == count_parameters(plain)[1] + count_parameters(model)[0]


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_its_adapter_reloads_on_a_4bit_base(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model, model={"quantization": QUANT}, lora={"r": 16, "alpha": 32},
                       train={"max_steps": 40, "lr": 1e-2, "warmup_steps": 2})
    section = ModelSection(path=str(tiny_model), quantization=QuantizationSection(**QUANT))
    before = packed_base(load_model(section, None))

    run_dir, model = run(path)

    losses = [m["loss"] for m in metrics(run_dir)]
    # As far as plain LoRA gets on this random tiny model in 40 steps (5.78 -> 4.95; QLoRA 5.78 -> 4.99).
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    # The 4-bit base is frozen: its packed bytes are those of a fresh 4-bit load.
    after = packed_base(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    tokenizer = load_tokenizer(section)
    batch = tokenizer(["count from three", "count from one two"], return_tensors="pt", padding=True)
    reloaded, is_adapter = load_tuned(section, run_dir)  # what `finetune eval` measures
    assert is_adapter and linear4bit_layers(reloaded)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        trained, again = model(**batch).logits, reloaded(**batch).logits
        with reloaded.disable_adapter():
            base = reloaded(**batch).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=0)
    assert (again - base).abs().max() > 0.1  # the adapter it reloaded is the trained one, not a no-op

    # Merging folds the adapter into the unquantized weights, and says so.
    out = tmp_path / "merged"
    assert cli.main(["merge", str(run_dir / "final"), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    unquantized, _ = load_tuned(ModelSection(path=str(tiny_model)), run_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, unquantized.eval()(**batch).logits, atol=1e-4, rtol=0)
        assert (merged(**batch).logits - trained).abs().max() > 1e-3  # the 4-bit rounding of the base is gone
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["quantization"] == QUANT


def test_merge_says_a_qlora_adapter_went_into_unquantized_weights(tmp_path, tiny_model, capsys):
    model = load_model(ModelSection(path=str(tiny_model), quantization=QuantizationSection()), LoraSection(r=4))
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "final")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_model), "quantization": QUANT}}))

    assert cli.main(["merge", str(run_dir / "final"), str(tmp_path / "merged")]) == 0
    said = capsys.readouterr().out
    assert "trained on a 4-bit (nf4) base (QLoRA)" in said and "merged into the unquantized base weights" in said

    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}}))
    assert cli.main(["merge", str(run_dir / "final"), str(tmp_path / "merged-2")]) == 0
    assert "QLoRA" not in capsys.readouterr().out


BITSANDBYTES_AT_EXIT = """import atexit, runpy, sys
atexit.register(lambda: print("bitsandbytes loaded:", sys.modules.get("bitsandbytes") is not None, file=sys.stderr))
sys.argv = ["finetune", *sys.argv[1:]]
runpy.run_module("finetune", run_name="__main__")
"""


@pytest.mark.slow
def test_finetune_train_loads_bitsandbytes_only_for_a_quantized_base(tmp_path, tiny_model):
    for name, sections in [("plain", {"lora": {"r": 4}}), ("qlora", {"model": {"quantization": QUANT}, "lora": {"r": 4}})]:
        path = make_recipe(tmp_path, tiny_model, name, train={"max_steps": 1}, **sections)
        proc = subprocess.run([sys.executable, "-c", BITSANDBYTES_AT_EXIT, "train", str(path)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"bitsandbytes loaded: {name == 'qlora'}" in proc.stderr, proc.stderr[-3000:]
        assert len(metrics(tmp_path / "runs" / name)) == 1
