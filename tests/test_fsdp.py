"""Accelerate's real FSDP2 path on CPU: `finetune train` on 2 gloo ranks under launch/fsdp.yaml, through
tests/engine_worker.py, which relabels the CPU launch as a GPU one and checks that FSDP2 was set up (DTensor
parameters). Compared with one process and the same global batch, and with itself interrupted."""

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import assert_close, make_recipe, metrics, run, weights
from multiproc import (FSDP_SEEN, LAUNCH, assert_forgetting_measured_as_in_one_process, assert_same_run, run_engine, two_ranks,
                       validation_file)
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
FSDP = LAUNCH / "fsdp.yaml"


CASES = {
    "full-llama-tied": ("tied", {"train": {"l2sp": 10.0, "eval_every": 2}, "data": {"packing": False}}),
    "full-qwen2": ("qwen2", {}),
    # wise_ft_alpha: the adapter scaled where each rank holds its shard, as one process scales it whole.
    "lora-llama": ("llama", {"lora": {"r": 4, "wise_ft_alpha": 0.5}, "train": {"l2sp": 10.0}}),
    "lora-checkpointing-llama": ("llama", {"lora": {"r": 4}, "model": {"gradient_checkpointing": True}}),
}


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_on_two_ranks_matches_one_process_with_the_same_global_batch(tmp_path, tiny_models, tied_llama, case):
    arch, sections = copy.deepcopy(CASES[case])
    model_dir = tied_llama if arch == "tied" else tiny_models[arch]
    if case == "full-llama-tied":
        sections["data"]["validation"] = [{"path": str(validation_file(tmp_path)), "format": "chat"}]
    one, two = two_ranks(tmp_path, model_dir, case, **sections)
    one_dir, _ = run(one)
    proc = run_engine(FSDP, two)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert FSDP_SEEN in proc.stdout and "on 2 process(es)" in proc.stdout
    two_dir = one_dir.parent / f"{case}-two"
    keys = ["loss", "grad_norm"]
    if "l2sp" in sections.get("train", {}):
        keys.append("l2sp")  # the whole penalty, not one rank's share of it
        assert metrics(two_dir)[-1]["l2sp"] > 0
    if "validation" in sections.get("data", {}):
        keys.append("val_loss")
        assert [m["step"] for m in metrics(two_dir) if "val_loss" in m] == [2, 4, 6]
    assert_same_run(one_dir, two_dir, keys)
    assert metrics(two_dir)[-1]["loss"] < metrics(two_dir)[0]["loss"]
    final = two_dir / "final"
    if "lora" in sections:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        loaded = peft.PeftModel.from_pretrained(base, final)
        adapter = load_file(final / "adapter_model.safetensors")
        assert adapter and all("lora_" in k for k in adapter)
        state = loaded.state_dict()
        for key, value in adapter.items():
            assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key
    else:
        saved = load_file(final / "model.safetensors")
        loaded = AutoModelForCausalLM.from_pretrained(final)
        for key, value in saved.items():
            assert torch.equal(loaded.state_dict()[key], value), key
        if arch == "tied":
            # One weight: not saved twice, and still one weight after loading.
            assert "lm_head.weight" not in saved
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def checkpoint_tensors(folder: Path) -> dict[str, int]:
    """{key: elements} of the tensors in one torch.distributed.checkpoint folder (a sharded checkpoint's model or
    optimizer part, as accelerate writes it)."""
    meta = FileSystemReader(str(folder)).read_metadata()
    return {k: v.size.numel() for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def test_fsdp2_lora_checkpoints_hold_the_adapter_and_a_killed_run_resumes_exactly(tmp_path, tiny_model):
    sections = dict(train={"max_steps": 8, "batch_size": 2, "grad_accum": 2}, output={"save_every": 3, "keep": 5},
                    lora={"r": 4})
    straight = make_recipe(tmp_path, tiny_model, "straight", **sections)
    resumed = make_recipe(tmp_path, tiny_model, "resumed", **sections)
    runs = tmp_path / "runs"
    proc = run_engine(FSDP, straight)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert FSDP_SEEN in proc.stdout

    # Adapter-sized: the model part of a checkpoint is the adapter, nothing of the frozen base, and the optimizer
    # state is two moments per adapter weight (plus step counts).
    adapter = sum(v.numel() for v in load_file(runs / "straight" / "final" / "adapter_model.safetensors").values())
    checkpoint = runs / "straight" / "checkpoints" / "step-3"
    model = checkpoint_tensors(checkpoint / "pytorch_model_fsdp_0")
    assert model and all(".lora_A." in k or ".lora_B." in k for k in model), sorted(model)[:4]
    assert sum(model.values()) == adapter
    assert 2 * adapter <= sum(checkpoint_tensors(checkpoint / "optimizer_0").values()) <= 2 * adapter + len(model)

    # kill -9 of both ranks while the step-6 checkpoint is being written: its shards are on disk, it is not complete.
    proc = run_engine(FSDP, resumed, env={"FINETUNE_TEST_KILL_AFTER_SAVE": "2"})
    assert proc.returncode != 0
    checkpoints = runs / "resumed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-6", "step-3"]
    proc = run_engine(FSDP, resumed)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resuming from {checkpoints / 'step-3'} (step 3 of 8)" in proc.stdout
    assert_close(weights(runs / "straight"), weights(runs / "resumed"), atol=0)
    assert [m["loss"] for m in metrics(runs / "straight")] == [m["loss"] for m in metrics(runs / "resumed")]


def test_forgetting_is_measured_during_an_fsdp2_run_as_in_one_process(tmp_path, base_dir, tasks):  # noqa: F811
    assert_forgetting_measured_as_in_one_process(tmp_path, base_dir, tasks, FSDP, FSDP_SEEN)
