"""Two ranks through `accelerate launch --config_file launch/cpu_ddp.yaml` against one rank with the same global batch."""

import shutil
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import assert_close, make_recipe, metrics, run, weights
from conftest import ddp_launch as launch
from multiproc import DIST_WORKER, assert_forgetting_measured_as_in_one_process
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def test_every_launch_config_parses_with_accelerate_and_names_a_valid_type():
    configs = sorted(LAUNCH.glob("*.yaml"))
    assert len(configs) >= 9
    for path in configs:
        config = load_config_from_file(str(path))
        assert config.distributed_type in set(DistributedType), path
        header = path.read_text().split("\ncompute_environment")[0]
        assert f"finetune launch --config_file launch/{path.name}" in header, f"{path.name}: no command in header"


# Clipping off in one case: a gradient off by a constant factor changes no clipped, Adam-normalised update much,
# but it shows in grad_norm, which is compared in every case.
CASES = {
    "full-llama-unclipped": ("llama", {"train": {"max_grad_norm": None}}),
    "lora-checkpointing-llama": ("llama", {"lora": {"r": 4}, "model": {"gradient_checkpointing": True}}),
    "full-qwen2": ("qwen2", {}),
}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_agree_and_match_one_rank_with_the_same_global_batch(tmp_path, tiny_models, case):
    arch, sections = CASES[case]
    sections = dict(sections)
    train = {"max_steps": 6, "lr": 1e-2, "warmup_steps": 1, **sections.pop("train", {})}
    # Answers of 1 to 8 words: the two ranks' halves of a global batch hold different numbers of target tokens.
    one = make_recipe(tmp_path, tiny_models[arch], "one", **sections, train={**train, "batch_size": 4})
    two = make_recipe(tmp_path, tiny_models[arch], "two", **sections, train={**train, "batch_size": 2})
    one_dir, _ = run(one)
    proc = launch("cpu_ddp.yaml", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_dir = one_dir.parent / "two"
    assert "on 2 process(es)" in proc.stdout
    ranks = [load_file(two_dir / f"rank{r}.safetensors") for r in (0, 1)]
    assert_close(ranks[0], ranks[1], atol=0)
    for a, b in zip(metrics(one_dir), metrics(two_dir), strict=True):
        assert a["target_tokens"] == b["target_tokens"], (a, b)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=1e-5), (a, b)
    assert_close(weights(one_dir), weights(two_dir), atol=1e-5)
    assert metrics(two_dir)[-1]["loss"] < metrics(two_dir)[0]["loss"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_resume_matches_an_uninterrupted_two_rank_run(tmp_path, tiny_model):
    # Dropout: each rank draws its own masks (their rows differ in length), so each must get its own RNG back.
    sections = dict(train={"max_steps": 8, "batch_size": 2, "grad_accum": 2}, output={"save_every": 3, "keep": 5},
                    lora={"r": 4, "dropout": 0.1})
    straight = make_recipe(tmp_path, tiny_model, "straight", **sections)
    resumed = make_recipe(tmp_path, tiny_model, "resumed", **sections)
    for recipe in (straight, resumed):
        proc = launch("cpu_ddp.yaml", recipe)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    # Crash after step 6 was saved and before the end.
    shutil.rmtree(runs / "resumed" / "final")
    proc = launch("cpu_ddp.yaml", resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {runs / 'resumed' / 'checkpoints' / 'step-6'} (step 6 of 8)" in proc.stdout
    assert_close(weights(runs / "straight"), weights(runs / "resumed"), atol=0)
    assert_close(load_file(runs / "resumed" / "rank0.safetensors"), load_file(runs / "resumed" / "rank1.safetensors"),
                 atol=0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_on_cpu_is_refused_not_silently_turned_into_ddp(tmp_path, tiny_model):
    """accelerate runs FSDP only on GPUs; with cpu=True it would quietly fall back to DDP."""
    recipe = make_recipe(tmp_path, tiny_model)
    proc = launch("fsdp.yaml", recipe, num_processes=2)
    assert proc.returncode != 0
    assert "launch/cpu_ddp.yaml" in proc.stderr and "supports" in proc.stderr
    assert not (tmp_path / "runs" / "r" / "final").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_forgetting_is_measured_during_a_ddp_run_as_in_one_process(tmp_path, base_dir, tasks):
    assert_forgetting_measured_as_in_one_process(tmp_path, base_dir, tasks, LAUNCH / "cpu_ddp.yaml",
                                                 "on 2 process(es)", worker=DIST_WORKER)
