"""Forgetting measured on tiny models and synthetic lm-eval tasks: lm-eval's numbers, exact zero for a model
against itself, the caches, and a model that visibly forgets what it was pre-trained on."""

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from conftest import ITEMS, fit, task_rows, texts, write_jsonl, write_task
from transformers import AutoModelForCausalLM

import finetune.evaluate as evaluate
from finetune.drift import kl_drift
from finetune.evaluate import ForgettingEval, evaluate_saved, evaluate_tasks
from finetune.forgetting import choose_best
from finetune.model import load_tokenizer
from finetune.recipe import EvalSection, ModelSection
from finetune.report import build_report, provenance

@pytest.fixture()
def section(tmp_path, base_dir) -> ModelSection:
    return ModelSection(path=str(base_dir), cache_dir=str(tmp_path / "cache"))


@pytest.fixture()
def drift_file(tmp_path) -> Path:
    path = tmp_path / "drift.txt"
    path.write_text("\n".join(texts(0)[:4] + ["the cat sat on the mat and the dog ran in the park"]) + "\n")
    return path


def load(section: ModelSection):
    return AutoModelForCausalLM.from_pretrained(section.path), load_tokenizer(section)


def test_a_model_against_itself_changes_nothing(section, tasks, drift_file):
    model, tokenizer = load(section)
    fe = ForgettingEval(EvalSection(tasks=[str(tasks["original"])], target_tasks=[str(tasks["conflict"])],
                                    drift_texts=[str(drift_file)]), section, tokenizer)
    report = build_report(fe.evaluate_base(model), fe.evaluate(model, step=1), max_drop=0.0, curve=fe.curve,
                          provenance=provenance(), final_note="")
    for change in [*report["tasks"].values(), *report["targets"].values()]:
        assert change["delta"] == 0 and change["ci95"] == [0, 0] and not change["significant"]
        assert change["flips"] == {"correct_to_wrong": 0, "wrong_to_correct": 0} and change["n"] == len(ITEMS)
    assert report["drift"]["kl"] == 0.0 and report["drift"]["ppl_ratio"] == 1.0
    assert report["verdict"]["within_budget"]
    # Two copies of the same weights, one in training mode (dropout must not leak into the measurement).
    copy = AutoModelForCausalLM.from_pretrained(section.path, attention_dropout=0.5).train()
    assert kl_drift(model, copy, tokenizer, texts(0), max_length=32).kl == 0.0
    assert copy.training


def test_scores_are_lm_evals_own(section, tasks):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load(section)
    ours = evaluate_tasks(model, tokenizer, [str(tasks["original"])], batch_size=4, limit=None)[str(tasks["original"])]
    direct = lm_eval.simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=["original"],
                                     task_manager=TaskManager(include_path=str(tasks["original"].parent),
                                                              include_defaults=False))
    assert ours.task == "original" and ours.metric == "acc_norm"
    assert ours.value == direct["results"]["original"]["acc_norm,none"]
    assert ours.examples == {f"original/{s['doc_id']}": s["acc_norm"] for s in direct["samples"]["original"]}
    assert ours.value > 0.9  # the pre-trained base knows its task


def test_a_group_is_scored_over_all_its_examples(section, tasks):
    group = tasks["original"].parent / "both.yaml"
    group.write_text("group: both\ntask: [original, conflict]\n", encoding="utf-8")
    model, tokenizer = load(section)
    both = evaluate_tasks(model, tokenizer, [str(group)], batch_size=8, limit=None)[str(group)]
    assert both.task == "both" and len(both.examples) == 2 * len(ITEMS)
    assert {k.split("/")[0] for k in both.examples} == {"original", "conflict"}
    assert both.value == pytest.approx(sum(both.examples.values()) / len(both.examples))


def test_base_evaluation_and_drift_texts_are_cached(section, tmp_path, monkeypatch):
    model, tokenizer = load(section)
    task = write_task(tmp_path / "tasks", "original", 0)
    spec = EvalSection(tasks=[str(task)], limit=8)
    # Fewer, shorter default texts than a real run samples: the same code path, a faster test.
    monkeypatch.setattr(evaluate, "DEFAULT_PROMPTS", ["The weather today is", "Q: what is a? A:"])
    monkeypatch.setattr(evaluate, "NEW_TOKENS", 8)
    runs = []
    real = evaluate._evaluate_loaded
    monkeypatch.setattr(evaluate, "_evaluate_loaded", lambda *a, **k: runs.append(1) or real(*a, **k))
    torch.manual_seed(123)
    random.seed(123)
    first = ForgettingEval(spec, section, tokenizer)
    base = first.evaluate_base(model)
    # lm-eval seeds the global generators and sampling draws from torch's: the training stream must not notice.
    assert torch.rand(1) == torch.rand(1, generator=torch.Generator().manual_seed(123))
    assert random.random() == random.Random(123).random()
    assert len(first.texts) == 2 and first.texts[0].startswith("The weather today is") and runs == [1]
    assert len(base.tasks[str(task)].examples) == 8

    with monkeypatch.context() as m:
        m.setattr(evaluate, "sample_texts", lambda *a, **k: pytest.fail("drift texts sampled again"))
        m.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("base loaded although everything is cached"))
        again = ForgettingEval(spec, section, tokenizer)
        assert again.evaluate_base(None) == base and again.texts == first.texts and runs == [1]
        # A data file edited in place is another task: evaluated again. So is another limit.
        rows = task_rows(0)
        rows[0]["label"] = 3
        write_jsonl(task.with_suffix(".jsonl"), rows)
        again.evaluate_base(model)
        ForgettingEval(EvalSection(tasks=[str(task)], limit=4), section, tokenizer).evaluate_base(model)
        assert runs == [1, 1, 1]


def test_fine_tuning_on_a_conflicting_task_forgets_the_original(section, tasks, drift_file, tmp_path):
    model, tokenizer = load(section)
    spec = EvalSection(tasks=[str(tasks["original"])], target_tasks=[str(tasks["conflict"])],
                       drift_texts=[str(drift_file)], max_drop=0.05)
    curve_file = tmp_path / "forgetting" / "curve.jsonl"
    fe = ForgettingEval(spec, section, tokenizer, curve_file=curve_file)
    base = fe.evaluate_base(model)
    torch.manual_seed(0)
    for step, steps in ((5, 5), (60, 55)):  # full fine-tuning, high learning rate
        fit(model, tokenizer, texts(1), lr=3e-3, steps=steps)
        fe.evaluate(model, step)
    report = build_report(base, fe.curve[-1], max_drop=spec.max_drop, curve=fe.curve, provenance=provenance(),
                          final_note="step 60, the last")
    original, new = report["tasks"]["original"], report["targets"]["conflict"]
    assert original["base"] > 0.9 and original["delta"] < -0.5 and original["significant"], original
    assert original["ci95"][1] < 0 and original["flips"]["correct_to_wrong"] >= 8
    assert new["delta"] > 0.5 and new["significant"], new
    assert report["drift"]["kl"] > 0 and report["drift"]["ppl_ratio"] > 1
    assert not report["verdict"]["within_budget"] and "original" in report["verdict"]["text"]
    assert [p["step"] for p in report["curve"]] == [0, 5, 60]
    best = choose_best(base, fe.curve, max_drop=1.0)
    assert best.step == 60  # with any drop allowed, the step that learned most
    # A run resumed from step 5 keeps the points it made up to there, and drops the later ones.
    resumed = ForgettingEval(spec, section, tokenizer, curve_file=curve_file, resumed_step=5)
    assert [e.step for e in resumed.curve] == [5] and resumed.curve[0] == fe.curve[0]
    assert len(curve_file.read_text().splitlines()) == 1


# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` (finetune.model silences it likewise).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_at_a_low_learning_rate_forgets_less_than_full_fine_tuning(section, tasks, drift_file, tmp_path):
    import peft

    from finetune.drift import AdapterDisabled
    from finetune.report import compare_runs

    spec = EvalSection(tasks=[str(tasks["original"])], target_tasks=[str(tasks["conflict"])],
                       drift_texts=[str(drift_file)])
    model, tokenizer = load(section)
    torch.manual_seed(0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    fit(lora, tokenizer, texts(1), lr=1e-3, steps=30)
    lora.save_pretrained(tmp_path / "lora" / "final")
    plain, _ = load(section)
    assert kl_drift(AdapterDisabled(lora), plain, tokenizer, texts(1), max_length=32).kl == 0.0  # the base, exactly
    full, _ = load(section)
    fit(full, tokenizer, texts(1), lr=3e-3, steps=30)
    full.save_pretrained(tmp_path / "full" / "final")
    # The standalone path of `finetune eval BASE RUN`: a full-weights run (its base loaded from disk) and an adapter
    # run (its base is the adapter switched off), each with a cache of its own so that both measure the base.
    reports = {name: evaluate_saved(dataclasses.replace(section, cache_dir=str(tmp_path / name / "cache")),
                                    tmp_path / name, spec, tmp_path / name / "forgetting")
               for name in ("full", "lora")}
    assert reports["full"]["tasks"]["original"]["base"] == reports["lora"]["tasks"]["original"]["base"]
    assert reports["full"]["targets"]["conflict"]["base"] == reports["lora"]["targets"]["conflict"]["base"]
    drop = {name: -r["tasks"]["original"]["delta"] for name, r in reports.items()}
    assert drop["lora"] < drop["full"] and drop["full"] > 0.5, drop
    assert reports["lora"]["drift"]["kl"] < reports["full"]["drift"]["kl"]
    assert (tmp_path / "lora" / "forgetting" / "report.html").is_file()
    runs = compare_runs([tmp_path / "lora", tmp_path / "full"], tmp_path / "compare")["runs"]
    assert runs[0]["pareto"]  # nothing forgets less


def test_drift_texts_from_files(tmp_path):
    from finetune.drift import DriftError, read_texts

    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "third text", "id": 1}])
    assert read_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == ["first text", "second text",
                                                                                 "third text"]
    write_jsonl(tmp_path / "c.jsonl", [{"content": "no text field"}])
    with pytest.raises(DriftError, match="c.jsonl line 1"):
        read_texts([str(tmp_path / "c.jsonl")])
    with pytest.raises(DriftError, match="does not exist"):
        read_texts([str(tmp_path / "missing.txt")])


def test_unknown_or_missing_tasks_are_explained(section, tmp_path):
    from finetune.evaluate import EvalError, load_tasks

    with pytest.raises(EvalError, match="does not exist"):
        load_tasks(str(tmp_path / "nope.yaml"))
    with pytest.raises(EvalError, match="both eval.tasks and eval.target_tasks"):
        ForgettingEval(EvalSection(tasks=["x.yaml"], target_tasks=["x.yaml"]), section, None)
