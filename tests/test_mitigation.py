"""Limiting forgetting: replay and the pull toward the base each lose less of the original task than the same
run without them."""

import json

import torch
from conftest import run, write_jsonl
from finetune.report import compare_runs
from safetensors.torch import load_file
from test_budget import conflicting_recipe
from test_evaluate import base_dir, tasks, texts  # noqa: F401 (fixtures)


def original_drop(run_dir) -> float:
    report = json.loads((run_dir / "forgetting" / "report.json").read_text())
    return -report["tasks"]["original"]["delta"]


def distance_from_base(run_dir, base) -> float:
    tuned, start = load_file(run_dir / "final" / "model.safetensors"), load_file(base / "model.safetensors")
    return sum(((tuned[k] - start[k]) ** 2).sum() for k in start).sqrt().item()


def test_replay_of_the_original_task_reduces_the_drop(tmp_path, base_dir, tasks):
    plain, _ = run(conflicting_recipe(tmp_path, base_dir, tasks), "output.dir=" + str(tmp_path / "plain"))
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"text": t} for t in texts(0)])
    mixed, _ = run(conflicting_recipe(tmp_path, base_dir, tasks), "output.dir=" + str(tmp_path / "replay"),
                   f"data.replay={{datasets: [{{path: {replay}, format: text}}], ratio: 0.3}}")
    assert original_drop(plain) > 0.5
    assert original_drop(mixed) < original_drop(plain) - 0.25, (original_drop(mixed), original_drop(plain))
    assert [r["method"] for r in compare_runs([plain, mixed], tmp_path / "cmp")["runs"]] == ["full, lr 0.003",
                                                                                          "full, lr 0.003, replay 30%"]


def test_a_large_l2sp_keeps_weights_near_the_base_and_reduces_the_drop(tmp_path, base_dir, tasks):
    plain, _ = run(conflicting_recipe(tmp_path, base_dir, tasks), "output.dir=" + str(tmp_path / "plain"))
    pulled, _ = run(conflicting_recipe(tmp_path, base_dir, tasks), "output.dir=" + str(tmp_path / "pulled"),
                    "train.l2sp=30")
    assert distance_from_base(pulled, base_dir) < 0.5 * distance_from_base(plain, base_dir)
    assert original_drop(pulled) < original_drop(plain) - 0.25, (original_drop(pulled), original_drop(plain))
    assert "l2sp" in json.loads((pulled / "metrics.jsonl").read_text().splitlines()[-1])
    assert compare_runs([pulled], tmp_path / "cmp")["runs"][0]["method"].endswith(", L2-SP 30")


def test_l2sp_for_lora_penalises_the_adapters_effective_update():
    from finetune.l2sp import PullToBase

    torch.manual_seed(0)
    a, b = torch.randn(2, 5, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    pull = PullToBase(torch.nn.Module(), lam=0.5)
    pull.adapters = [(a, b, 1.5)]  # one LoRA layer: A is r x in, B is out x r, scale 1.5
    penalty = pull.apply()
    delta = 1.5 * b @ a  # the update LoRA adds to the frozen weight
    expected = 0.5 * (delta ** 2).sum()
    assert torch.allclose(penalty, expected.detach())
    ga, gb = torch.autograd.grad(expected, [a, b])
    assert torch.allclose(a.grad, ga) and torch.allclose(b.grad, gb)
