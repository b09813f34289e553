"""`finetune plan`: the estimate against memory measured on CPU (tiny model), exact arithmetic where there is some,
the table and verdicts for the shipped recipes, offline."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from finetune import cli
from finetune.plan import GiB, PlanError, estimate, load_layout, read_launch, usable_bytes
from finetune.recipe import ModelSection, load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import plan_check  # noqa: E402  (the measurement the README's 135M figures come from)

RECIPES = ROOT / "recipes"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the hub: the shipped configs must be enough."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the variable is too late
    monkeypatch.chdir(ROOT)


def recipe(name: str, *overrides: str):
    return load_recipe(RECIPES / name, list(overrides))


@pytest.mark.parametrize("path, params", [
    # The sizes the model cards state, from the shipped configs with one layer built on the meta device.
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
    ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
])
def test_shipped_configs_give_the_published_parameter_counts(path, params):
    layout = load_layout(ModelSection(path=path))
    assert layout.params == params
    assert [l.group for l in layout.linears] == ["attn_in"] * 3 + ["attn_out"] + ["mlp_in"] * 2 + ["mlp_out"]
    assert layout.gated


# Each case trains the tiny model at the benchmark's shapes (8 packed rows of up to 256 tokens) for 3 steps and
# compares the plan's peak with the peak of live tensor bytes the profiler saw. Measured: errors of +1% to +14%.
@pytest.mark.slow
@pytest.mark.parametrize("mode, overrides", [
    ("full", []),
    ("lora", []),
    ("full", ["model.gradient_checkpointing=true"]),
    ("lora", ["model.gradient_checkpointing=true"]),
    ("full", ["train.mixed_precision=bf16"]),  # CPU autocast: bf16 copies of inputs and weights
    ("qlora", []),  # 4-bit base, checkpointing on by default
    ("qlora", ["train.mixed_precision=bf16", "model.gradient_checkpointing=false"]),
])
def test_plan_is_within_15_percent_of_the_peak_measured_on_cpu(tmp_path, mode, overrides):
    r = plan_check.bench_recipe(str(ROOT / "data" / "tiny-llama"), mode, tmp_path, overrides, steps=3)
    measured = plan_check.measure(r)["tensors"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    planned = plan_check.planned(r)
    assert abs(planned / measured - 1) < 0.15, (planned / 2**20, measured / 2**20)


@pytest.mark.slow
def test_checkpointing_is_what_the_plan_says_it_saves(tmp_path):
    """Checkpointing roughly halves the tiny model's peak, measured and planned alike (before train_step put the model
    in training mode, transformers silently skipped it and the measured peak did not move)."""
    tiny = str(ROOT / "data" / "tiny-llama")
    peaks = {}
    for ckpt in (False, True):
        (tmp_path / str(ckpt)).mkdir()
        r = plan_check.bench_recipe(tiny, "lora", tmp_path / str(ckpt), [f"model.gradient_checkpointing={ckpt}"], 2)
        peaks[ckpt] = plan_check.measure(r)["tensors"], plan_check.planned(r)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert peaks[True][0] < 0.7 * peaks[False][0]
    assert peaks[True][1] < 0.7 * peaks[False][1]


def test_engines_shard_what_they_should_and_send_what_rings_send():
    r = recipe("qwen2.5-7b-full-fsdp.yaml")
    layout = load_layout(r.model)
    launch = read_launch(ROOT / "launch" / "fsdp.yaml", None)
    assert (launch.engine, launch.processes, launch.mixed_precision) == ("FSDP", 8, "bf16")
    est = {e: estimate(layout, r, launch, e, True) for e in ("DDP", "FSDP", "ZeRO-2", "ZeRO-3")}
    p, n, k = layout.params, 8, r.train.grad_accum
    # fp32 weights and gradients, AdamW's two fp32 states; FSDP shards all three.
    assert est["DDP"].parts["weights"] == p * 4 and est["FSDP"].parts["weights"] == p * 4 / n
    assert est["DDP"].parts["optimizer state"] == p * 8 and est["FSDP"].parts["optimizer state"] == p * 8 / n
    # DeepSpeed: bf16 weights (ZeRO-2 replicates them, ZeRO-3 shards them), fp32 master and states sharded.
    assert est["ZeRO-2"].parts["weights"] == p * 2 and est["ZeRO-3"].parts["weights"] == p * 2 / n
    assert est["ZeRO-3"].parts["optimizer state"] == p * 12 / n
    # Ring all-reduce of fp32 gradients once per update; FSDP gathers bf16 weights twice per micro-step and
    # reduce-scatters bf16 gradients once.
    assert est["DDP"].sent == pytest.approx(2 * 7 / 8 * p * 4)
    assert est["FSDP"].sent == pytest.approx(k * 2 * 7 / 8 * p * 2 + 7 / 8 * p * 2)
    assert est["ZeRO-3"].sent == pytest.approx(k * (2 * 7 / 8 * p * 2 + 7 / 8 * p * 2))
    assert est["ZeRO-3"].peak < est["ZeRO-2"].peak < est["DDP"].peak
    # Checkpointing keeps one input per layer instead of every activation.
    assert estimate(layout, r, launch, "FSDP", False).parts["activations"] > 5 * est["FSDP"].parts["activations"]


def test_qlora_weights_are_half_a_byte_plus_scales_and_float32_for_the_rest():
    r = recipe("llama3.1-8b-qlora-1gpu.yaml")
    layout = load_layout(r.model)
    one = read_launch(None, None)
    weights = estimate(layout, r, one, "one device", True).parts["weights"]
    lora_params = estimate(layout, r, one, "one device", True).trainable
    linear = layout.linear_params
    scales = 1 / 64 + 4 / (64 * 256)  # double quantization: 8-bit scales per 64 weights, fp32 per 256 scales
    assert weights == pytest.approx(linear * (0.5 + scales) + (layout.params - linear) * 4 + lora_params * 4)
    no_quant = recipe("llama3.1-8b-qlora-1gpu.yaml", "model.quantization=null")
    assert estimate(layout, no_quant, one, "one device", True).parts["weights"] > 1.9 * weights


def test_lora_from_a_layer_up_trains_only_those_layers_adapters():
    r = recipe("llama3.1-8b-qlora-1gpu.yaml")
    layout, one = load_layout(r.model), read_launch(None, None)
    every = estimate(layout, r, one, "one device", True).trainable
    upper = recipe("llama3.1-8b-qlora-1gpu.yaml", f"lora.first_layer={layout.layers - 8}")
    assert estimate(layout, upper, one, "one device", True).trainable == every * 8 / layout.layers


def test_shipped_8b_recipe_under_fsdp_prints_its_table_offline(capsys):
    assert cli.main(["plan", "recipes/llama3.1-8b-lora-alpaca.yaml", "--launch-config", "launch/fsdp.yaml"]) == 0
    out = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B-Instruct (config shipped with finetune)" in out and "8.03B parameters" in out
    header = next(line for line in out.splitlines() if line.startswith("| per device"))
    assert header == "| per device, GiB | DDP | FSDP (launch) | ZeRO-2 | ZeRO-3 |"
    for row in ("weights", "gradients", "optimizer state", "activations", "loss buffers", "engine buffers",
                "**peak, checkpointing on**", "peak, checkpointing off", "fits 80 GiB", "sent per update, GiB"):
        assert any(line.startswith(f"| {row} |") for line in out.splitlines()), row
    assert "verdict: fits. Under FSDP on 8 devices" in out


def test_verdicts_fit_and_do_not_fit_with_what_would_help(capsys):
    assert cli.main(["plan", "recipes/llama3.1-8b-qlora-1gpu.yaml", "--gpu-memory", "24"]) == 0
    assert "verdict: fits. On one device" in capsys.readouterr().out
    assert cli.main(["plan", "recipes/llama3.1-8b-qlora-1gpu.yaml", "--gpu-memory", "14"]) == 0
    assert "verdict: does not fit" in (out := capsys.readouterr().out) and "train.batch_size=1" in out
    # Full fine-tuning of a 7B model: 16 bytes a weight fit 8 x 80 GB only sharded.
    assert cli.main(["plan", "recipes/qwen2.5-7b-full-fsdp.yaml", "--launch-config", "launch/multi_gpu_ddp.yaml"]) == 0
    out = capsys.readouterr().out
    assert "verdict: does not fit. Under DDP on 8 devices" in out and "Would fit: FSDP; ZeRO-2; ZeRO-3." in out
    fits = next(line for line in out.splitlines() if line.startswith("| fits 80 GiB"))
    assert fits.split("|")[2:6] == [" no ", " yes ", " yes ", " yes "]
    assert cli.main(["plan", "recipes/qwen2.5-7b-full-fsdp.yaml", "model.path=meta-llama/Llama-3.1-70B-Instruct",
                     "--launch-config", "launch/fsdp.yaml"]) == 0
    assert "Nothing here makes it fit" in capsys.readouterr().out  # 70B: 1.1 TB of state over 8 devices
    # QLoRA is not sharded: only one device and DDP are offered.
    assert cli.main(["plan", "recipes/llama3.1-8b-qlora-1gpu.yaml", "--launch-config", "launch/fsdp.yaml"]) == 0
    assert "verdict: not supported: finetune runs QLoRA on one device or under DDP" in capsys.readouterr().out


@pytest.mark.parametrize("config, engine", [("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "ZeRO-3"),
                                            ("multi_gpu_ddp.yaml", "DDP")])
def test_a_one_process_launch_config_gets_one_column_for_its_own_engine(capsys, config, engine):
    # A 1-process FSDP2 or ZeRO-3 run is a real case (bench/gpu_check.py runs one).
    assert cli.main(["plan", "recipes/llama3.1-8b-lora-alpaca.yaml", "--launch-config", f"launch/{config}",
                     "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert f"| per device, GiB | {engine} |" in out.splitlines()
    assert "verdict: fits. On one device" in out


def test_processes_below_one_are_refused():
    for n in (0, -2):
        with pytest.raises(PlanError, match=f"1 or more, not {n}"):
            read_launch(ROOT / "launch" / "fsdp.yaml", n)
        with pytest.raises(PlanError, match=f"1 or more, not {n}"):
            read_launch(None, n)


def test_unknown_models_and_launch_configs_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(PlanError, match=r"no config for `model\.path` someone/unknown-7b.*ships the configs of.*"
                                        r"meta-llama/Llama-3\.1-8B-Instruct"):
        load_layout(ModelSection(path="someone/unknown-7b"))
    zero1 = tmp_path / "zero1.yaml"
    zero1.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config: {zero_stage: 1}\n")
    with pytest.raises(PlanError, match="knows DeepSpeed ZeRO stages 2 and 3, not 1"):
        read_launch(zero1, None)
    assert read_launch(ROOT / "launch" / "deepspeed_zero3.yaml", 4).processes == 4  # --processes wins


def test_verdict_keeps_room_for_the_cuda_context_and_the_allocator():
    assert usable_bytes(80) == pytest.approx((80 * 0.95 - 1) * GiB)


def test_plan_is_in_the_help_and_runs_without_loading_weights(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "finetune plan recipes/llama3.1-8b-lora-alpaca.yaml --launch-config launch/fsdp.yaml" in proc.stdout
    # A local folder with a config.json and no weights at all is enough.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((ROOT / "data" / "tiny-llama" / "config.json").read_text())
    r = recipe("tiny-lora.yaml", f"model.path={folder}")
    layout = load_layout(r.model)
    assert layout.params == sum(t.numel() for t in _tiny_weights().values())
    assert dataclasses.asdict(layout)["layers"] == 2


def _tiny_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ROOT / "data" / "tiny-llama" / "model.safetensors")
