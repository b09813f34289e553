"""`train.kl_to_base`: KL(base || tuned) on general prompts. Exactly 0 while the model is the base, the gradient of
the penalty it reports, no second copy of the weights under LoRA, less forgetting than the same run without it, and
the same run for any number of ranks or a resume."""

import gc
import json
import shutil
import warnings

import pytest
import torch
from accelerate import Accelerator
from conftest import (assert_close, conflicting_recipe, make_recipe, metrics, original_drop, run, texts, weights,
                      write_jsonl)
from conftest import ddp_launch as launch

from finetune.engine import Engine, engine
from finetune.mitigations import Context, kl_to_base
from finetune.model import load_model
from finetune.model_files import load_tokenizer
from finetune.recipe import RecipeError, describe_keys, load_recipe
from finetune.reports.compare import compare_runs

TOPICS = ["the cat", "paris", "counting", "the park", "the alphabet", "a question"]
SAYINGS = ["the cat sat on the mat", "paris is the capital of france", "one two three four five six seven",
           "the dog ran in the park and the cat sat", "abcdefghijklmnopqrstuvwxyz", "what is the capital of france?"]


def general_rows() -> list[dict]:
    """Chat rows unlike the training task, with replies of varied length (so ranks hold different KL counts)."""
    return [{"messages": [{"role": "user", "content": f"tell me about {TOPICS[i % 6]}"},
                          {"role": "assistant", "content": " ".join([SAYINGS[i % 6]] * (1 + i % 3))}]}
            for i in range(12)]


def kl_override(path, weight=1.0, rows=3, fmt="chat") -> str:
    return f"train.kl_to_base={{weight: {weight}, datasets: [{{path: {path}, format: {fmt}}}], rows_per_step: {rows}}}"


@pytest.fixture
def general(tmp_path):
    return write_jsonl(tmp_path / "general.jsonl", general_rows())


def set_up(recipe):
    """The regularizer as a run builds it, in this process, with the model it works on."""
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, recipe.lora)
    accelerator = Accelerator(cpu=True)
    return kl_to_base.regularizer(recipe, Context(accelerator, engine(accelerator), model, tokenizer)), model


# ---------------------------------------------------------------- the recipe


def test_the_recipe_switch_is_validated_and_names_the_run(tmp_path, tiny_model, general):
    recipe = make_recipe(tmp_path, tiny_model)
    assert load_recipe(recipe).train.kl_to_base is None
    assert "rows_per_step: 4  # rows of that data per optimizer update" in describe_keys()
    section = load_recipe(recipe, [kl_override(general, weight=0.5, rows=2)]).train.kl_to_base
    assert (section.weight, section.rows_per_step, section.datasets[0].format) == (0.5, 2, "chat")
    for override, message in [
        ("train.kl_to_base={datasets: []}", r"`train\.kl_to_base\.datasets` is empty"),
        (kl_override(general, weight=0), r"`train\.kl_to_base\.weight` is 0; it must be a number > 0"),
        (kl_override(general, rows=0), r"`train\.kl_to_base\.rows_per_step` is 0"),
        (kl_override(tmp_path / "missing.jsonl"), r"`train\.kl_to_base\.datasets\[0\]\.path`: file .* does not exist"),
        ("train.kl_to_base={wieght: 1}", r"unknown key `train\.kl_to_base\.wieght`\. Did you mean "
                                         r"`train\.kl_to_base\.weight`"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe, [override])


def test_sharded_engines_are_refused_with_what_to_do(tmp_path, tiny_model, general):
    recipe = load_recipe(make_recipe(tmp_path, tiny_model), [kl_override(general)])
    for name in ("FSDP", "DEEPSPEED"):
        ctx = Context(None, Engine(name), None, None)
        with pytest.raises(kl_to_base.KLToBaseError, match=f"not supported under {name}.*DDP.*kl_to_base: null"):
            kl_to_base.regularizer(recipe, ctx)


# ---------------------------------------------------------------- the penalty and its gradient


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_penalty_is_exactly_zero_while_the_model_is_the_base(tmp_path, tiny_model, general, lora):
    """The first update's penalty is taken before its optimizer step: the tuned model is the base, bit for bit."""
    run_dir, _ = run(make_recipe(tmp_path, tiny_model, lora={"r": 4} if lora else None), kl_override(general))
    logged = [m["kl_to_base"] for m in metrics(run_dir)]
    assert logged[0] == 0.0
    assert all(v > 0 for v in logged[1:]), logged


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_gradient_matches_finite_differences(tmp_path, tiny_models, general, lora):
    # GPT-NeoX: its LayerNorm computes in the model's dtype; Llama's RMSNorm works in float32 even in a float64
    # model, and that rounding swamps a central difference.
    recipe = load_recipe(make_recipe(tmp_path, tiny_models["gpt_neox"], lora={"r": 4} if lora else None),
                         [kl_override(general, weight=0.7, rows=4)])
    reg, model = set_up(recipe)
    model.double()  # float64: central differences agree with the gradient to ~1e-8
    if reg.base is not None:
        reg.base.double()
    torch.manual_seed(1)
    with torch.no_grad():  # away from the base (LoRA: B = 0 at the start), so the KL and its gradient are not 0
        for p in reg.params:
            p.add_(0.1 * torch.randn_like(p))
    modes = [m.training for m in model.modules()]
    penalty = reg.apply()
    assert [m.training for m in model.modules()] == modes  # the base pass gave every module its own mode back
    gradient = [p.grad.clone() for p in reg.params]
    reg.stream.load_state_dict({"updates": 0})
    rows = reg.stream.next_share(0, 1)

    def value() -> float:
        with torch.no_grad():
            kl, positions = reg.kl_sum(rows)
        return 0.7 * kl.item() / positions.item()

    assert value() == pytest.approx(penalty.item(), rel=1e-12) and penalty > 0
    direction = [torch.randn_like(p) for p in reg.params]

    def move(by: float) -> None:
        with torch.no_grad():
            for p, d in zip(reg.params, direction):
                p.add_(by * d)

    eps = 1e-6
    move(eps)
    above = value()
    move(-2 * eps)
    below = value()
    move(eps)
    numeric = (above - below) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(gradient, direction)).item()
    assert numeric == pytest.approx(analytic, rel=1e-6), (numeric, analytic)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (views of one storage counted once)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # the scan touches torch.distributed's deprecated `reduce_op`
        warnings.simplefilter("ignore", FutureWarning)
        objects = [o for o in gc.get_objects() if torch.is_tensor(o)]
    for o in objects:
        if o.device.type == "cpu":
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_under_lora_no_second_copy_of_the_weights_is_held(tmp_path, tiny_model, general, lora):
    """What the regularizer and one step of it leave alive: nearly nothing with LoRA (the base is the same weights
    with the adapter off), one copy of the weights for full fine-tuning, which shows the count would see one."""
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, lora={"r": 4} if lora else None), [kl_override(general)])
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, recipe.lora)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    accelerator = Accelerator(cpu=True)
    before = live_tensor_bytes()
    reg = kl_to_base.regularizer(recipe, Context(accelerator, engine(accelerator), model, tokenizer))
    reg.apply()
    model.zero_grad(set_to_none=True)
    added = live_tensor_bytes() - before
    if lora:
        assert added < 0.02 * weight_bytes, (added, weight_bytes)
    else:
        assert 0.95 * weight_bytes < added < 1.1 * weight_bytes, (added, weight_bytes)


# ---------------------------------------------------------------- what it is for


def drift(run_dir) -> float:
    return json.loads((run_dir / "forgetting" / "report.json").read_text())["drift"]["text"]["kl"]


def test_kl_to_the_base_reduces_the_drop_and_the_drift(tmp_path, base_dir, tasks):
    """The tiny base knows nothing but the original task, so its lines are the general prompts the penalty is taken
    on, as in the replay test, and the texts drift is measured on. (The base's own sampled continuations, the default
    drift texts, change with the CPU's rounding in a model this small: without the penalty their drift measured 0.65
    in one environment and 1.81 in another, and the test's claim flipped with it.)

    Measured with 2 threads (default), OMP_NUM_THREADS=1 and ONEDNN_MAX_CPU_ISA=AVX2, the same in each: drop 1.0
    without the penalty, 0.125 with it (bound: 0.5); drift 0.257 and 0.062 (bound: half); the new task's loss from
    1.71 to 0.506 without it and 0.584 with it (bounds: 0.506 and 1.11)."""
    lines = write_jsonl(tmp_path / "original_lines.jsonl", [{"text": t} for t in texts(0)])
    recipe = conflicting_recipe(tmp_path, base_dir, tasks, drift_texts=[str(lines)])
    plain, _ = run(recipe, "output.dir=" + str(tmp_path / "plain"))
    kept, _ = run(recipe, "output.dir=" + str(tmp_path / "kl"), kl_override(lines, weight=1, rows=8, fmt="text"))
    assert original_drop(plain) > 0.5
    assert original_drop(kept) < original_drop(plain) - 0.5, (original_drop(kept), original_drop(plain))
    assert drift(kept) < 0.5 * drift(plain), (drift(kept), drift(plain))
    # A trade, not a freeze: the new task, which contradicts the original one here, is still learned, less far than
    # without the penalty. Its training loss says so more finely than 16 items scored right or wrong.
    first, last_kept, last_plain = metrics(kept)[0]["loss"], metrics(kept)[-1]["loss"], metrics(plain)[-1]["loss"]
    assert last_plain < last_kept < first - 0.5 * (first - last_plain), (first, last_kept, last_plain)
    assert compare_runs([kept], tmp_path / "cmp")["runs"][0]["label"].endswith(", KL to base 1")


# ---------------------------------------------------------------- the same run however it is split


def test_a_resumed_run_draws_the_same_prompts_as_an_uninterrupted_one(tmp_path, tiny_model, general):
    sections = dict(lora={"r": 4}, train={"max_steps": 6}, output={"save_every": 3, "keep": 5})
    straight, _ = run(make_recipe(tmp_path, tiny_model, "straight", **sections), kl_override(general))
    resumed, _ = run(make_recipe(tmp_path, tiny_model, "resumed", **sections), kl_override(general))
    shutil.rmtree(resumed / "final")  # a crash after step 3 was saved
    run(resumed.parent.parent / "resumed.yaml", kl_override(general))
    assert [m["kl_to_base"] for m in metrics(resumed)] == [m["kl_to_base"] for m in metrics(straight)]
    assert_close(weights(straight), weights(resumed), atol=0)

    # Turned on for the rest of a run that trained without it (--accept-changes): its prompts start from the first.
    switched, _ = run(make_recipe(tmp_path, tiny_model, "switched", **sections))
    shutil.rmtree(switched / "final")
    run(switched.parent.parent / "switched.yaml", kl_override(general), accept_changes=True)
    assert ["kl_to_base" in m for m in metrics(switched)] == [False] * 3 + [True] * 3


CASES = {"full": ({}, {"batch_size": 2}), "lora-accumulated": ({"lora": {"r": 4}}, {"batch_size": 1, "grad_accum": 2})}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_log_the_same_penalty_and_end_with_the_same_weights_as_one(tmp_path, tiny_model, general, case):
    """3 KL rows per update: one rank takes 2 of them, the other 1, with different numbers of KL positions."""
    sections, two_ranks = CASES[case]
    train = {"max_steps": 6, "lr": 5e-3, "warmup_steps": 1}
    one = make_recipe(tmp_path, tiny_model, "one", **sections, train={**train, "batch_size": 4})
    two = make_recipe(tmp_path, tiny_model, "two", **sections, train={**train, **two_ranks})
    one_dir, _ = run(one, kl_override(general, rows=3))
    proc = launch("cpu_ddp.yaml", two, kl_override(general, rows=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_dir = one_dir.parent / "two"
    assert_close(*(weights_of_rank(two_dir, r) for r in (0, 1)), atol=0)
    for a, b in zip(metrics(one_dir), metrics(two_dir), strict=True):
        assert a["kl_to_base"] == pytest.approx(b["kl_to_base"], rel=1e-4, abs=1e-9), (a, b)
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert metrics(two_dir)[-1]["kl_to_base"] > 0
    assert_close(weights(one_dir), weights(two_dir), atol=1e-5)


def weights_of_rank(run_dir, rank: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / f"rank{rank}.safetensors")


def test_first_tokens_keeps_only_the_start_of_each_reply():
    # Two rows: replies (runs of target positions) of several lengths, one at the very start and one at the end.
    keep = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 0, 0, 0, 1, 1]]).bool()
    assert kl_to_base.first_of_each_run(keep, 2).long().tolist() == [[0, 1, 1, 0, 0, 0, 1, 1, 0, 0],
                                                                      [1, 1, 0, 0, 1, 0, 0, 0, 1, 1]]
    assert torch.equal(kl_to_base.first_of_each_run(keep, 10), keep)
    assert not kl_to_base.first_of_each_run(torch.zeros(1, 4, dtype=torch.bool), 3).any()


def test_the_run_is_named_by_its_kl_positions_and_its_system_prompt(tmp_path, tiny_model, general):
    from finetune.mitigations import method_label

    recipe = make_recipe(tmp_path, tiny_model)
    plain = load_recipe(recipe, [kl_override(general)])
    assert method_label(plain).endswith("KL to base 1") and "system prompt" not in method_label(plain)
    first = load_recipe(recipe, [kl_override(general), "train.kl_to_base.first_tokens=4",
                                 f"data.train=[{{path: {general}, format: chat, system: Sort words.}}]"])
    assert method_label(first).endswith("system prompt, KL to base 1 (first 4 tokens)")
