import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, make_recipe, metrics, run, weights
from safetensors.torch import load_file

from finetune.cli import main as cli_main
from finetune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_loss_falls_on_a_memorisation_task(tmp_path, tiny_models, arch):
    path = make_recipe(tmp_path, tiny_models[arch], train={"max_steps": 40, "lr": 1e-2, "warmup_steps": 2})
    run_dir, _ = run(path)
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"):
        assert key in metrics(run_dir)[-1]
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "final" / "tokenizer.json").exists()


def test_lora_trains_only_the_adapter_and_leaves_base_weights_bit_identical(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model, lora={"r": 4, "alpha": 8})
    run_dir, model = run(path)
    base = load_file(tiny_model / "model.safetensors")
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() <= state.keys()
    for k, v in base.items():
        assert torch.equal(v, state[k]), k
    adapter = weights(run_dir)
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapter did learn


def test_adapter_in_final_loads_with_peft(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, model = run(make_recipe(tmp_path, tiny_model, lora={"r": 4}))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    loaded = PeftModel.from_pretrained(base, run_dir / "final").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)


def test_grad_accumulation_2x2_equals_batch_4(tmp_path, tiny_model):
    a, _ = run(make_recipe(tmp_path, tiny_model, "a", train={"batch_size": 4, "grad_accum": 1}))
    b, _ = run(make_recipe(tmp_path, tiny_model, "b", train={"batch_size": 2, "grad_accum": 2}))
    for ma, mb in zip(metrics(a), metrics(b), strict=True):
        assert abs(ma["loss"] - mb["loss"]) < 1e-5 and ma["target_tokens"] == mb["target_tokens"]
    assert_close(weights(a), weights(b), atol=1e-5)


def test_seeded_runs_are_reproducible_and_seeds_matter(tmp_path, tiny_model):
    a, _ = run(make_recipe(tmp_path, tiny_model, "a", lora={"r": 4, "dropout": 0.1}))
    b, _ = run(make_recipe(tmp_path, tiny_model, "b", lora={"r": 4, "dropout": 0.1}))
    c, _ = run(make_recipe(tmp_path, tiny_model, "c", lora={"r": 4, "dropout": 0.1}, train={"seed": 1}))
    assert_close(weights(a), weights(b), atol=0)
    assert any(not torch.equal(weights(a)[k], weights(c)[k]) for k in weights(a))


@pytest.mark.parametrize("lora", [None, {"r": 4, "dropout": 0.1}], ids=["full", "lora"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, tiny_model, lora, capsys):
    # Dropout, warmup and a second epoch make the test sensitive to RNG, schedule and data position.
    sections = dict(train={"max_steps": 12, "warmup_steps": 3, "grad_accum": 2, "batch_size": 2},
                    output={"save_every": 3, "keep": 10}, lora=lora)
    straight, _ = run(make_recipe(tmp_path, tiny_model, "straight", rows=24, **sections))
    resumed, _ = run(make_recipe(tmp_path, tiny_model, "resumed", rows=24, **sections))
    # A crash while step 9 was being saved: its files are there but not its progress record.
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "step-9" / "progress.json").unlink()
    capsys.readouterr()
    run(resumed.parent.parent / "resumed.yaml")
    assert f"resuming from {resumed / 'checkpoints' / 'step-6'} (step 6 of 12)" in capsys.readouterr().out
    assert_close(weights(straight), weights(resumed), atol=0)
    assert [m["step"] for m in metrics(resumed)] == list(range(1, 13))
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(straight)]


def test_existing_run_is_resumed_refused_or_moved_never_overwritten(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model, "r")
    run_dir, _ = run(path)
    before = weights(run_dir)
    assert cli_main(["train", str(path)]) == 0  # finished: nothing to do
    assert_close(weights(run_dir), before, atol=0)
    assert cli_main(["train", str(path), "train.lr=1e-2"]) == 2  # result-changing key: refused
    assert cli_main(["train", str(path), "train.lr=1e-2", "--new-run"]) == 0
    assert (run_dir.parent / "r-2" / "final").exists()
    assert_close(weights(run_dir), before, atol=0)
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "precious.txt").write_text("mine")
    assert cli_main(["train", str(path), f"output.dir={other}"]) == 2
    assert (other / "precious.txt").read_text() == "mine"


def test_refusal_names_the_changed_keys(tmp_path, tiny_model, capsys):
    path = make_recipe(tmp_path, tiny_model, output={"save_every": 2}, train={"max_steps": 4})
    run_dir, _ = run(path)
    shutil.rmtree(run_dir / "final")
    capsys.readouterr()
    assert cli_main(["train", str(path), "train.lr=0.05", "lora.r=2"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.003 -> 0.05" in err and "lora.r: None -> 2" in err and "--accept-changes" in err


def test_validation_loss_is_logged_and_falls(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model, data={"val_fraction": 0.25},
                       train={"max_steps": 20, "eval_every": 5, "lr": 1e-2})
    run_dir, _ = run(path)
    val = [m["val_loss"] for m in metrics(run_dir) if "val_loss" in m]
    assert len(val) == 4 and val[-1] < val[0]


def test_gradient_checkpointing_with_lora_gives_the_same_run(tmp_path, tiny_model):
    a, _ = run(make_recipe(tmp_path, tiny_model, "a", lora={"r": 4}))
    b, _ = run(make_recipe(tmp_path, tiny_model, "b", lora={"r": 4}, model={"gradient_checkpointing": True}))
    assert_close(weights(a), weights(b), atol=1e-6)


def test_too_little_data_for_one_update_is_explained(tmp_path, tiny_model):
    path = make_recipe(tmp_path, tiny_model, rows=3, train={"batch_size": 8}, data={"packing": False})
    assert cli_main(["train", str(path)]) == 2


@pytest.mark.slow
def test_cli_end_to_end_from_a_shipped_recipe_then_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "finetune", "train", "recipes/tiny-lora.yaml", f"output.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {"recipe.yaml", "metrics.jsonl", "checkpoints", "final"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-20"]
    assert load_recipe(out / "recipe.yaml").train.lr == 3e-3
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "finetune", "merge", str(out / "final"), str(merged)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in k for k in model.state_dict())


def test_bf16_autocast_keeps_fp32_master_weights_and_optimizer_state(tmp_path, tiny_model):
    fp32, _ = run(make_recipe(tmp_path, tiny_model, "fp32", train={"max_steps": 2}))
    bf16, model = run(make_recipe(tmp_path, tiny_model, "bf16", train={"max_steps": 2, "mixed_precision": "bf16"},
                                  output={"save_every": 1}))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for v in weights(bf16).values())
    optimizer = torch.load(bf16 / "checkpoints" / "step-1" / "optimizer.bin", weights_only=True)
    assert all(t.dtype == torch.float32 for s in optimizer["state"].values() for k, t in s.items() if k != "step")
    # Autocast really ran in bf16: the losses differ from fp32's, but only by rounding.
    a, b = metrics(fp32)[0]["loss"], metrics(bf16)[0]["loss"]
    assert a != b and abs(a - b) < 0.05


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_compiled_model_trains_the_same_run(tmp_path, tiny_model, lora):
    eager, _ = run(make_recipe(tmp_path, tiny_model, "eager", train={"max_steps": 6}, lora=lora))
    compiled, model = run(make_recipe(tmp_path, tiny_model, "compiled", train={"max_steps": 6, "compile": True},
                                      lora=lora))
    assert model._compiled_call_impl is not None  # it really ran compiled
    a, b = [m["loss"] for m in metrics(eager)], [m["loss"] for m in metrics(compiled)]
    assert a[-1] < a[0] and b == pytest.approx(a, abs=1e-4)
    assert sorted(p.name for p in (compiled / "final").iterdir()) == sorted(p.name for p in (eager / "final").iterdir())
