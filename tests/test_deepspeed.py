"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU: `finetune train` on 2 gloo ranks under launch/deepspeed_zero{2,3}.yaml, through
tests/engine_worker.py (DeepSpeed's own CPU accelerator stands in for CUDA; the worker checks the engine and its ZeRO
stage). Compared with one process and the same global batch, and with itself killed and resumed."""

import copy

import pytest
import torch
from conftest import make_recipe, run
from multiproc import (LAUNCH, assert_forgetting_measured_as_in_one_process, assert_same_run, run_engine, two_ranks,
                       validation_file)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

try:
    import deepspeed  # noqa: F401
except ImportError as e:  # a failure, not a skip: these tests are part of the suite
    raise ImportError("the DeepSpeed tests need the `deepspeed` extra: bash scripts/install.sh, or "
                      "pip install -e '.[deepspeed]'") from e

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
ZERO2, ZERO3 = LAUNCH / "deepspeed_zero2.yaml", LAUNCH / "deepspeed_zero3.yaml"
ZERO2_SEEN = "engine-check: DEEPSPEED zero_stage=2 parameters partitioned=False"
ZERO3_SEEN = "engine-check: DEEPSPEED zero_stage=3 parameters partitioned=True"

# max_grad_norm 1.0 (the default) is what the launch configs' gradient_clipping does inside DeepSpeed's engine.
CASES = {
    "zero2-full-llama": (ZERO2, "llama", {}),
    "zero3-full-tied-llama": (ZERO3, "tied", {"train": {"grad_accum": 2, "eval_every": 2}, "data": {"packing": False}}),
    "zero3-lora-qwen2": (ZERO3, "qwen2", {"lora": {"r": 4}}),
}


@pytest.mark.parametrize("case", CASES)
def test_deepspeed_on_two_ranks_matches_one_process_with_the_same_global_batch(tmp_path, tiny_models, tied_llama,
                                                                               case):
    config, arch, sections = copy.deepcopy(CASES[case])
    model_dir = tied_llama if arch == "tied" else tiny_models[arch]
    if "data" in sections:
        sections["data"]["validation"] = [{"path": str(validation_file(tmp_path)), "format": "chat"}]
    sections["train"] = {"max_grad_norm": 1.0, **sections.get("train", {})}
    one, two = two_ranks(tmp_path, model_dir, case, **sections)
    one_dir, _ = run(one)
    proc = run_engine(config, two)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (ZERO3_SEEN if config == ZERO3 else ZERO2_SEEN) in proc.stdout
    assert "on 2 process(es)" in proc.stdout
    trainable, total = (int(n.replace(",", "")) for n in proc.stdout.split("Training ")[1].split(" parameters")[0]
                        .split(" of "))
    assert 0 < trainable <= total  # counted from DeepSpeed's sizes: ZeRO-3 leaves each rank empty placeholders
    two_dir = one_dir.parent / f"{case}-two"
    keys = ["loss", "grad_norm"] + (["val_loss"] if "data" in sections else [])
    assert_same_run(one_dir, two_dir, keys)
    if arch == "tied":
        saved = load_file(two_dir / "final" / "model.safetensors")
        assert "lm_head.weight" not in saved
        loaded = AutoModelForCausalLM.from_pretrained(two_dir / "final")
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


RESUMES = {
    # ZeRO-2 keeps whole weights in its checkpoints' module state: a LoRA run must leave the frozen base out.
    "zero2-lora": (ZERO2, {"lora": {"r": 4}}),
    "zero3-full": (ZERO3, {}),
}


@pytest.mark.parametrize("case", RESUMES)
def test_deepspeed_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_model, case):
    config, sections = RESUMES[case]
    train = {"max_steps": 8, "grad_accum": 2, "lr": 3e-3}
    output = {"save_every": 3, "keep": 5}
    one = make_recipe(tmp_path, tiny_model, "one", **sections, train={**train, "batch_size": 4}, output=output)
    two = make_recipe(tmp_path, tiny_model, "two", **sections, train={**train, "batch_size": 2}, output=output)
    one_dir, _ = run(one)
    proc = run_engine(config, two, env={"FINETUNE_TEST_KILL_AFTER_SAVE": "2"})
    assert proc.returncode != 0
    checkpoints = one_dir.parent / "two" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-6", "step-3"]
    if "lora" in sections:
        state = torch.load(checkpoints / "step-3" / "pytorch_model" / "mp_rank_00_model_states.pt",
                           weights_only=False)["module"]
        assert state and all(".lora_A." in k or ".lora_B." in k for k in state), sorted(state)[:4]
    proc = run_engine(config, two)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resuming from {checkpoints / 'step-3'} (step 3 of 8)" in proc.stdout
    assert_same_run(one_dir, one_dir.parent / "two", keys=("loss",))


def test_forgetting_is_measured_during_a_zero3_run_as_in_one_process(tmp_path, base_dir, tasks):  # noqa: F811
    assert_forgetting_measured_as_in_one_process(tmp_path, base_dir, tasks, ZERO3, ZERO3_SEEN)


def test_l2sp_under_deepspeed_is_refused_rather_than_silently_ignored(tmp_path, tiny_model):
    proc = run_engine(ZERO2, make_recipe(tmp_path, tiny_model, train={"l2sp": 0.1}))
    assert proc.returncode != 0
    assert "error: `train.l2sp` is not supported under DeepSpeed" in proc.stderr
    assert not (tmp_path / "runs" / "r" / "final").exists()
