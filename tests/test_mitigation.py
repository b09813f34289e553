"""Limiting forgetting: replay and the pull toward the base each lose less of the original task than the same
run without them."""

import json

import torch
from conftest import conflicting_recipe, original_drop, run, texts, write_jsonl
from finetune.reports.compare import compare_runs
from safetensors.torch import load_file


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
    assert [r["label"] for r in compare_runs([plain, mixed], tmp_path / "cmp")["runs"]] == ["full, lr 0.003",
                                                                                          "full, lr 0.003, replay 30%"]


def test_a_large_l2sp_keeps_weights_near_the_base_and_reduces_the_drop(tmp_path, base_dir, tasks):
    plain, _ = run(conflicting_recipe(tmp_path, base_dir, tasks), "output.dir=" + str(tmp_path / "plain"))
    pulled, _ = run(conflicting_recipe(tmp_path, base_dir, tasks), "output.dir=" + str(tmp_path / "pulled"),
                    "train.l2sp=30")
    assert distance_from_base(pulled, base_dir) < 0.5 * distance_from_base(plain, base_dir)
    assert original_drop(pulled) < original_drop(plain) - 0.25, (original_drop(pulled), original_drop(plain))
    assert "l2sp" in json.loads((pulled / "metrics.jsonl").read_text().splitlines()[-1])
    assert compare_runs([pulled], tmp_path / "cmp")["runs"][0]["label"].endswith(", L2-SP 30")


def test_l2sp_for_lora_penalises_the_adapters_effective_update():
    from finetune.mitigations.l2sp import PullToBase

    torch.manual_seed(0)
    a, b = torch.randn(2, 5, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    pull = PullToBase(torch.nn.Module(), lam=0.5)
    pull.adapters = [(a, b, 1.5, None)]  # one LoRA layer: A is r x in, B is out x r, scale 1.5
    penalty = pull.apply()
    delta = 1.5 * b @ a  # the update LoRA adds to the frozen weight
    expected = 0.5 * (delta ** 2).sum()
    assert torch.allclose(penalty, expected.detach())
    ga, gb = torch.autograd.grad(expected, [a, b])
    assert torch.allclose(a.grad, ga) and torch.allclose(b.grad, gb)


def test_fisher_weighted_penalty_and_its_gradient_are_exact():
    from finetune.mitigations.l2sp import PullToBase

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    fisher = [torch.rand(3, 4), torch.rand(3)]
    pull = PullToBase(layer, lam=0.5, fisher=fisher)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    moved = [p.detach() - p0 for p, p0 in zip(layer.parameters(), pull.base)]
    penalty = pull.apply()
    assert torch.allclose(penalty, 0.5 * sum((f * d ** 2).sum() for f, d in zip(fisher, moved)))
    for p, f, d in zip(layer.parameters(), fisher, moved):
        assert torch.allclose(p.grad, 2 * 0.5 * f * d)

    # LoRA: the weighting applies per element of the update scale * B @ A.
    a, b = torch.randn(2, 5, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    f = torch.rand(3, 5)
    pull = PullToBase(torch.nn.Module(), lam=0.5, fisher=[f])
    pull.adapters = [(a, b, 1.5, None)]
    expected = 0.5 * (f * (1.5 * b @ a) ** 2).sum()
    assert torch.allclose(pull.apply(), expected.detach())
    ga, gb = torch.autograd.grad(expected, [a, b])
    assert torch.allclose(a.grad, ga) and torch.allclose(b.grad, gb)


def fisher_of_base(recipe_path, base_dir, *overrides):
    """The Fisher a run with this recipe measures, by name of the base model's parameters."""
    from finetune.mitigations.l2sp import diagonal_fisher, fisher_batches
    from finetune.model_files import load_tokenizer
    from finetune.recipe import load_recipe
    from finetune.loss import token_loss_sum
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(recipe_path, list(overrides))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    batches = fisher_batches(recipe.train.l2sp_fisher, recipe.data, load_tokenizer(recipe.model), 0, "cpu")
    model.train()
    fisher = diagonal_fisher(model, batches, token_loss_sum)
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored after the pass
    return model, dict(zip(named, fisher)), batches


def test_diagonal_fisher_is_the_mean_squared_gradient_and_lora_measures_the_same(tmp_path, base_dir, tasks):
    import peft
    from finetune.mitigations.l2sp import diagonal_fisher
    from finetune.loss import token_loss_sum

    original = write_jsonl(tmp_path / "original.jsonl", [{"text": t} for t in texts(0)])
    ewc = f"train.l2sp_fisher={{datasets: [{{path: {original}, format: text}}], rows: 6}}"
    model, fisher, batches = fisher_of_base(conflicting_recipe(tmp_path, base_dir, tasks), base_dir,
                                            "train.l2sp=1", ewc)
    assert len(batches) == 6
    model.eval()
    name = "model.layers.0.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    direct = sum(torch.autograd.grad(token_loss_sum(model, dict(b)) / (b["labels"] != -100).sum(), weight)[0] ** 2
                 for b in batches) / len(batches)
    total = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert abs(total.item() - 1) < 1e-5
    ratio = fisher[name] / direct  # the same up to the normalising constant
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-3)

    # With LoRA the Fisher is of the frozen base weights under the adapters (B = 0: the model is the base).
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["down_proj"], lora_dropout=0.0))
    lora.train()
    (lora_fisher,) = diagonal_fisher(lora, batches, token_loss_sum)[:1]
    assert not lora.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.requires_grad
    ratio = lora_fisher / direct
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-3)


def test_ewc_holds_the_weights_the_original_task_needs_closer_than_plain_l2sp(tmp_path, base_dir, tasks):
    original = write_jsonl(tmp_path / "original.jsonl", [{"text": t} for t in texts(0)])
    ewc = f"train.l2sp_fisher={{datasets: [{{path: {original}, format: text}}], rows: 16}}"
    recipe = conflicting_recipe(tmp_path, base_dir, tasks)
    plain, _ = run(recipe, "output.dir=" + str(tmp_path / "l2sp"), "train.l2sp=1")
    weighted, _ = run(recipe, "output.dir=" + str(tmp_path / "ewc"), "train.l2sp=1", ewc)
    _, fisher, _ = fisher_of_base(recipe, base_dir, "train.l2sp=1", ewc)
    start = load_file(base_dir / "model.safetensors")
    values = torch.cat([f.flatten() for n, f in fisher.items() if n in start])
    important = values.quantile(0.95)  # the 5% of weights the original task's loss is most sensitive to

    def share_moved_of_important(run_dir):
        tuned = load_file(run_dir / "final" / "model.safetensors")
        moved = {n: (tuned[n] - start[n]) ** 2 for n in fisher if n in start}
        return (sum((m * (fisher[n] >= important)).sum() for n, m in moved.items())
                / sum(m.sum() for m in moved.values())).item()

    assert share_moved_of_important(weighted) < 0.5 * share_moved_of_important(plain), (
        share_moved_of_important(weighted), share_moved_of_important(plain))
    assert compare_runs([weighted], tmp_path / "cmp")["runs"][0]["label"].endswith(", EWC 1")
