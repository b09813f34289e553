"""Forgetting measured on tiny models and synthetic lm-eval tasks: lm-eval's numbers, exact zero for a model
against itself, the caches, and a model that visibly forgets what it was pre-trained on."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import ANSWERS, ITEMS, fit, task_rows, texts, write_generation_task, write_jsonl, write_task
from transformers import AutoModelForCausalLM

import finetune.measure.evaluate as evaluate
from finetune import precision
from finetune.measure.drift import _Draw, kl_drift
from finetune.measure.prefix_sharing import with_shared_lead
from finetune.measure.evaluate import ForgettingEval, without_logs
from finetune.measure.saved import evaluate_saved
from finetune.measure.tasks import evaluate_tasks
from finetune.model import output_layer
from finetune.reports.forgetting import choose_best
from finetune.model_files import load_tokenizer
from finetune.recipe import EvalSection, ModelSection
from finetune.reports.report import build_report, provenance, render_markdown


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
    assert all(inputs is not None for inputs in fe.base_inputs.values())  # the base ran once, before training
    half = 1.959963984540054 ** 2 / (len(ITEMS) + 1.959963984540054 ** 2)  # nothing changed, yet n is finite
    for change in [*report["tasks"].values(), *report["targets"].values()]:
        assert change["delta"] == 0 and change["ci95"] == pytest.approx([-half, half]) and not change["significant"]
        assert change["flips"] == {"correct_to_wrong": 0, "wrong_to_correct": 0} and change["n"] == len(ITEMS)
    # Raw text from the file, and the base's own chat replies in the tokenizer's template: both exactly 0.
    assert set(report["drift"]) == {"text", "chat"} and report["drift"]["chat"]["texts"] == 100
    for d in report["drift"].values():
        assert d["kl"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["ppl_ratio"] == 1.0
    assert report["verdict"]["status"] == "INCONCLUSIVE"  # never FAIL; PASS needs more than 16 examples
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
    assert ours.task == "original" and ours.metric == "acc"  # the first metric the YAML lists
    assert ours.value == direct["results"]["original"]["acc,none"]
    assert ours.examples == {f"original/{s['doc_id']}": s["acc"] for s in direct["samples"]["original"]}
    assert ours.others["acc_norm"] == {f"original/{s['doc_id']}": s["acc_norm"] for s in direct["samples"]["original"]}
    assert ours.value > 0.9 and ours.chance == 0.25  # the pre-trained base knows its task; four options
    assert ours.expected["original/0"] == ANSWERS[0] and ours.prompts["original/0"] == "Q: what is a? A:"


def test_a_group_is_scored_over_all_its_examples(section, tasks):
    group = tasks["original"].parent / "both.yaml"
    group.write_text("group: both\ntask: [original, conflict]\n", encoding="utf-8")
    model, tokenizer = load(section)
    both = evaluate_tasks(model, tokenizer, [str(group)], batch_size=8, limit=None)[str(group)]
    assert both.task == "both" and len(both.examples) == 2 * len(ITEMS)
    assert {k.split("/")[0] for k in both.examples} == {"original", "conflict"}
    assert both.value == pytest.approx(sum(both.examples.values()) / len(both.examples))


def write_fewshot_task(folder: Path, shots: list[dict]) -> Path:
    """The original task with one few-shot example taken from a file of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    test = write_jsonl(folder / "fs.jsonl", task_rows(0))
    shot_file = write_jsonl(folder / "fs_shots.jsonl", shots)
    path = folder / "fs.yaml"
    path.write_text(f"""task: fs
dataset_path: json
dataset_kwargs:
  data_files: {{test: {test}, shots: {shot_file}}}
test_split: test
fewshot_split: shots
num_fewshot: 1
fewshot_config: {{sampler: first_n}}
output_type: multiple_choice
doc_to_text: "Q: what is {{{{item}}}}? A:"
doc_to_choice: {json.dumps(ANSWERS)}
doc_to_target: label
""", encoding="utf-8")
    return path


def test_base_evaluation_and_drift_texts_are_cached(section, tmp_path, monkeypatch):
    model, tokenizer = load(section)
    task = write_task(tmp_path / "tasks", "original", 0)
    spec = EvalSection(tasks=[str(task)], limit=8)
    # Fewer, shorter default texts than a real run samples: the same code path, a faster test.
    monkeypatch.setattr(evaluate, "PROMPTS", {"text": ["The weather today is", "Q: what is a? A:"],
                                              "chat": ["Say hello.", "What is a?", "Count to three."]})
    monkeypatch.setattr(evaluate, "NEW_TOKENS", 8)
    runs = []
    real = evaluate.evaluate_loaded
    monkeypatch.setattr(evaluate, "evaluate_loaded", lambda *a, **k: runs.append(1) or real(*a, **k))
    torch.manual_seed(123)
    random.seed(123)
    first = ForgettingEval(spec, section, tokenizer)
    base = first.evaluate_base(model)
    # lm-eval seeds the global generators and sampling draws from torch's: the training stream must not notice.
    assert torch.rand(1) == torch.rand(1, generator=torch.Generator().manual_seed(123))
    assert random.random() == random.Random(123).random()
    assert [len(first.texts[k]) for k in ("text", "chat")] == [2, 3] and runs == [1]
    assert first.texts["text"][0].startswith("The weather today is")
    chat_text, reply_start = first.texts["chat"][0]
    assert chat_text.startswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    assert chat_text[:reply_start].endswith("<|im_start|>assistant\n")  # measured from the reply on
    assert len(base.tasks[str(task)].examples) == 8

    with monkeypatch.context() as m:
        for sampler in ("sample_texts", "sample_chat"):
            m.setattr(evaluate, sampler, lambda *a, **k: pytest.fail("drift texts sampled again"))
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

    # Another chat template changes every prompt under apply_chat_template, and the chat drift texts: both missed.
    chat = EvalSection(tasks=[str(task)], limit=4, apply_chat_template=True)
    ForgettingEval(chat, section, tokenizer).evaluate_base(model)
    assert runs == [1, 1, 1, 1]
    other = load_tokenizer(section, chat_template=tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> "))
    retemplated = ForgettingEval(chat, section, other)
    retemplated.evaluate_base(model)
    assert runs == [1, 1, 1, 1, 1] and retemplated.texts["chat"] != first.texts["chat"]
    ForgettingEval(chat, section, tokenizer).evaluate_base(model)
    assert runs == [1, 1, 1, 1, 1]  # the first template's entry is still there
    # A few-shot file edited in place is another task too.
    shots = [{"item": "z", "label": 0}]
    fewshot = EvalSection(tasks=[str(write_fewshot_task(tmp_path / "fs", shots))], limit=4)
    ForgettingEval(fewshot, section, tokenizer).evaluate_base(model)
    ForgettingEval(fewshot, section, tokenizer).evaluate_base(model)
    assert runs == [1] * 6
    write_fewshot_task(tmp_path / "fs", [{"item": "z", "label": 2}])
    ForgettingEval(fewshot, section, tokenizer).evaluate_base(model)
    assert runs == [1] * 7


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
    assert report["drift"]["text"]["kl"] > 0 and report["drift"]["text"]["ppl_ratio"] > 1
    assert report["drift"]["chat"]["ci95"][0] > 0  # the base's chat replies moved too, beyond resampling noise
    assert report["verdict"]["status"] == "FAIL" and "original" in report["verdict"]["text"]
    assert len(original["forgotten"]) == 5 and original["forgotten"][0]["base"] != original["forgotten"][0]["tuned"]
    assert [p["step"] for p in report["curve"]] == [0, 5, 60]
    best = choose_best(base, fe.curve, max_drop=1.0)
    assert best.step == 60  # with any drop allowed, the step that learned most
    # A run resumed from step 5 keeps the points it made up to there, and drops the later ones.
    resumed = ForgettingEval(spec, section, tokenizer, curve_file=curve_file, resumed_step=5)
    assert [e.step for e in resumed.curve] == [5] and resumed.curve[0] == without_logs(fe.curve[0])  # kept small
    assert len(curve_file.read_text().splitlines()) == 1


# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` (finetune.model silences it likewise).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_at_a_low_learning_rate_forgets_less_than_full_fine_tuning(section, tasks, drift_file, tmp_path):
    import peft

    from finetune.measure.drift import AdapterDisabled
    from finetune.reports.compare import compare_runs

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
    assert reports["lora"]["drift"]["text"]["kl"] < reports["full"]["drift"]["text"]["kl"]
    assert (tmp_path / "lora" / "forgetting" / "report.html").is_file()
    runs = compare_runs([tmp_path / "lora", tmp_path / "full"], tmp_path / "compare")["runs"]
    assert runs[0]["pareto"]  # nothing forgets less


def test_drift_texts_are_drawn_from_the_models_own_distribution():
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0, -math.inf]]).repeat(200_000, 1)
    kept = _Draw(torch.Generator().manual_seed(0))(None, scores)
    assert (kept.isfinite().sum(-1) == 1).all()  # one token left per row: greedy decoding takes it
    drawn = kept.argmax(-1)
    share = torch.bincount(drawn, minlength=5).double() / len(drawn)
    p = torch.softmax(scores[0].double(), -1)
    # 200,000 draws: each share within 5 binomial standard errors; a token of probability 0 never
    assert ((share - p).abs() <= 5 * (p * (1 - p) / len(drawn)).sqrt()).all() and share[4] == 0, (share, p)


def test_sampling_with_a_shared_lead_continues_each_prompt_as_the_whole_prompt_does(section):
    model, tokenizer = load(section)
    lead = "Answer the question below in a few words, as a careful assistant would: "
    prompts = [lead + q for q in ("what is a?", "what is b, and why?", "say hello.")]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    shared = with_shared_lead(model, enc["input_ids"], enc["attention_mask"], tokenizer.pad_token_id or 0)
    assert {"cache", "past_key_values"} & set(shared)  # the lead ran once, its cache repeated
    with torch.no_grad():
        whole = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        led = model.generate(**shared, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    width = enc["input_ids"].shape[1]
    assert torch.equal(whole[:, width:], led[:, width:])
    plain = tokenizer(["a", "b"], return_tensors="pt", padding=True)
    assert with_shared_lead(model, plain["input_ids"], plain["attention_mask"], 0) is None  # nothing shared


def test_drift_texts_from_files(tmp_path):
    from finetune.measure.drift import DriftError, read_texts

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
    from finetune.measure.tasks import EvalError, load_tasks

    with pytest.raises(EvalError, match="does not exist"):
        load_tasks(str(tmp_path / "nope.yaml"))
    with pytest.raises(EvalError, match="both eval.tasks and eval.target_tasks"):
        ForgettingEval(EvalSection(tasks=["x.yaml"], target_tasks=["x.yaml"]), section, None)


def direct_lm_eval(model, tokenizer, task_yaml: Path, chat: bool = False):
    """lm-eval called as its own docs show, on the same in-memory model: the reference our scores must equal."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = task_yaml.stem
    out = lm_eval.simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=[name],
                                  task_manager=TaskManager(include_path=str(task_yaml.parent), include_defaults=False),
                                  log_samples=True, apply_chat_template=chat, fewshot_as_multiturn=chat)
    return out["results"][name], {f"{name}/{s['doc_id']}": s for s in out["samples"][name]}


def test_acc_and_acc_norm_are_both_kept_and_match_lm_eval_on_a_mid_range_base(section, tmp_path):
    # Options of very different lengths: raw log-likelihood favours the short ones, per-character the long ones, so
    # acc and acc_norm pick differently and the base lands mid-range, far from its 0.9+ on its own task.
    model, tokenizer = load(section)
    options = ["one", "two three four five", "a", "the cat sat on the mat"]
    folder = tmp_path / "mc"
    task = write_task(folder, "lengths", 0)
    task.write_text(task.read_text().replace(json.dumps(ANSWERS), json.dumps(options)))
    ours = evaluate_tasks(model, tokenizer, [str(task)], batch_size=4, limit=None)[str(task)]
    results, samples = direct_lm_eval(model, tokenizer, task)
    assert ours.metric == "acc" and ours.value == results["acc,none"] and 0.2 <= ours.value <= 0.8, ours.value
    assert ours.examples == {k: s["acc"] for k, s in samples.items()}
    assert ours.others["acc_norm"] == {k: s["acc_norm"] for k, s in samples.items()}
    assert ours.examples != ours.others["acc_norm"]  # a mix-up of the two would show
    for key, sample in samples.items():  # the answer shown is the option lm-eval's acc picked
        chosen = max(range(4), key=lambda i: sample["filtered_resps"][i][0])
        assert ours.answers[key] == options[chosen]
        assert (ours.examples[key] == 1.0) == (options[chosen] == ours.expected[key])


def test_a_generation_task_with_filters_matches_lm_eval(section, tmp_path):
    model, tokenizer = load(section)
    task = write_generation_task(tmp_path / "gen")
    ours = evaluate_tasks(model, tokenizer, [str(task)], batch_size=4, limit=None)[str(task)]
    results, samples = direct_lm_eval(model, tokenizer, task)
    assert ours.metric == "exact_match" and ours.value == results["exact_match,first_word"] and ours.chance is None
    first_word = {k: s for k, s in samples.items() if s["filter"] == "first_word"}
    assert ours.examples == {k: s["exact_match"] for k, s in first_word.items()}
    assert ours.answers == {k: s["filtered_resps"][0] for k, s in first_word.items()}  # what was scored
    assert ours.value > 0.5  # the base answers its own task by generation too


def test_the_chat_template_path_matches_lm_eval_called_directly(section, tmp_path):
    model, tokenizer = load(section)
    task = write_fewshot_task(tmp_path / "fs", [{"item": "z", "label": 0}, {"item": "y", "label": 1}])
    ours = evaluate_tasks(model, tokenizer, [str(task)], batch_size=4, limit=None, chat=True)[str(task)]
    results, samples = direct_lm_eval(model, tokenizer, task, chat=True)
    assert ours.value == results["acc,none"] and ours.examples == {k: s["acc"] for k, s in samples.items()}
    # The prompt went through the template, with the few-shot example as an earlier turn.
    context = samples["fs/0"]["arguments"][0][0]
    assert context.startswith("<|im_start|>user\nQ: what is z? A:<|im_end|>\n<|im_start|>assistant\none<|im_end|>")


def test_drift_grows_with_the_interpolation_alpha(section, drift_file):
    from finetune.mitigations.wise_ft import set_alpha

    base, tokenizer = load(section)
    model, _ = load(section)
    torch.manual_seed(0)
    fit(model, tokenizer, texts(1), lr=3e-3, steps=30)
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kls = []
    for alpha in (0.0, 0.25, 0.5, 1.0):
        set_alpha(model, alpha, False, base.state_dict(), tuned)
        kls.append(kl_drift(base, model, tokenizer, texts(0), max_length=32).kl)
    assert kls[0] == 0.0 and kls[0] < kls[1] < kls[2] < kls[3], kls


def base_and_moved(section, lead: str = ""):
    """The base, a copy with every weight moved a little, the tokenizer, and drift texts of many lengths (so
    batches pad), one measured from a character on, one too short to measure. With a `lead`, every text begins
    with it and is measured after it (as a chat text after its system turn)."""
    base, tokenizer = load(section)
    tuned, _ = load(section)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    items = [t * (1 + i % 3) for i, t in enumerate(texts(0)[:9])] + [[texts(1)[0], 10], "a"]
    if lead:
        items = [[lead + t, len(lead)] for t in items[:-2]] + [[lead + texts(1)[0], len(lead) + 10], [lead, len(lead)]]
    return base, tuned, tokenizer, items


LEAD = " ".join(texts(1)[1].split()[:6]) + " . "  # a prefix of 8 tokens or more that drift batches run once


@pytest.mark.parametrize("lead", ["", LEAD])
def test_drift_from_the_bases_cached_head_inputs_is_the_drift_from_running_it(section, monkeypatch, lead):
    import finetune.measure.drift as drift

    base, tuned, tokenizer, items = base_and_moved(section, lead)
    monkeypatch.setattr(drift, "TOKENS_PER_PASS", 64)  # several batches
    for autocast in (None, torch.bfloat16):
        inputs = drift.head_inputs(base, tokenizer, items, max_length=32, autocast=autocast)
        assert inputs[-1] is None and all(i.shape[0] > 0 for i in inputs[:-1])
        ran = kl_drift(base, tuned, tokenizer, items, max_length=32, autocast=autocast)
        cached = kl_drift(None, tuned, tokenizer, items, max_length=32, autocast=autocast, base_inputs=inputs,
                          base_head=output_layer(base))
        assert cached == ran and ran.kl > 0.01  # to the bit


def test_a_model_whose_logits_are_more_than_its_heads_output_runs_the_base_every_time(section):
    import finetune.measure.drift as drift

    class SoftCapped(torch.nn.Module):  # as Gemma 2's final_logit_softcapping
        def __init__(self, model):
            super().__init__()
            self.model = model

        def get_output_embeddings(self):
            return self.model.get_output_embeddings()

        def forward(self, **inputs):
            out = self.model(**inputs)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

    base, tokenizer = load(section)
    assert drift.head_inputs(base, tokenizer, texts(0), max_length=32) is not None
    assert drift.head_inputs(SoftCapped(base), tokenizer, texts(0), max_length=32) is None


@pytest.mark.parametrize("lead", ["", LEAD])
def test_drift_in_batches_is_each_texts_own_kl(section, monkeypatch, lead):
    import finetune.measure.drift as drift

    base, tuned, tokenizer, items = base_and_moved(section, lead)
    monkeypatch.setattr(drift, "TOKENS_PER_PASS", 64)  # several batches of several texts
    shared, real = [], drift._layout
    monkeypatch.setattr(drift, "_layout", lambda *a: shared.append(real(*a).prefix) or real(*a))
    batched = kl_drift(base, tuned, tokenizer, items, max_length=32)
    # A batch's common lead runs once; texts that share none run whole.
    assert all((p is not None and p.shape[1] >= 8) == bool(lead) for p in shared[:-1]), shared
    kl = tokens = lp_base = lp_tuned = 0.0
    for item in items:  # each text alone, unpadded, by hand
        text, start = (item, 0) if isinstance(item, str) else item
        enc = tokenizer(text, truncation=True, max_length=32, return_offsets_mapping=True)
        measured = [t for t, (begin, _) in enumerate(enc["offset_mapping"]) if t > 0 and begin >= start]
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            b, t = (torch.log_softmax(m(input_ids=ids).logits[0].double(), -1) for m in (base, tuned))
        for pos in measured:
            before, token = pos - 1, ids[0, pos]
            kl += float((b[before].exp() * (b[before] - t[before])).sum())
            lp_base, lp_tuned = lp_base + float(b[before, token]), lp_tuned + float(t[before, token])
            tokens += 1
    assert batched.tokens == tokens and batched.texts == len(items) - 1
    assert batched.kl == pytest.approx(kl / tokens, rel=1e-5) and batched.kl > 0.01
    assert batched.ppl_base == pytest.approx(math.exp(-lp_base / tokens), rel=1e-5)
    assert batched.ppl_tuned == pytest.approx(math.exp(-lp_tuned / tokens), rel=1e-5)


def test_an_evaluation_starts_no_survey_of_the_machine(section, tasks, monkeypatch):
    # lm-eval's add_env_info runs torch.utils.collect_env (pip list, lscpu, ... in subprocesses) on every call.
    import lm_eval.loggers.utils
    import torch.utils.collect_env

    surveys = []  # lm-eval catches any exception from it, so calls are counted rather than refused
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: surveys.append(1) or "")
    monkeypatch.setattr(lm_eval.loggers.utils, "get_pretty_env_info", lambda: surveys.append(1) or "", raising=False)
    model, tokenizer = load(section)
    scores = evaluate_tasks(model, tokenizer, [str(tasks["original"])], batch_size=8, limit=4)
    assert len(scores[str(tasks["original"])].examples) == 4 and surveys == []


def test_the_greedy_flag_from_row_maxima_is_argmaxs_ties_included():
    from finetune.measure.prefix_sharing import is_greedy

    torch.manual_seed(0)
    lp = torch.randn(6, 50).round(decimals=1)  # coarse values: ties within rows
    lp[0, 3] = lp[0, 7] = lp[0].max() + 1  # a tie for the top: argmax takes 3, not 7
    top = lp.amax(-1)
    argmax = lp.argmax(-1).tolist()
    for at in ([0], [0, 1], [2, 3, 4], [5]):
        for tokens in ([argmax[k] for k in at], [7] + [argmax[k] for k in at[1:]],
                       [argmax[k] for k in at[:-1]] + [(argmax[at[-1]] + 1) % 50]):
            assert is_greedy(lp, top, at, tokens) == all(argmax[k] == t for k, t in zip(at, tokens)), (at, tokens)
    assert is_greedy(lp, top, [0], [3]) and not is_greedy(lp, top, [0], [7])


@pytest.mark.parametrize("chat", [False, True])
def test_shared_prefixes_give_lm_evals_own_log_likelihoods(section, tmp_path, monkeypatch, chat):
    # Each prompt encoded once for its four options must give what lm-eval's own path gives, option by option,
    # including options of several tokens (scored after the repeated cache of the prompt), with prompts of several
    # lengths in one left-padded batch; in the chat template the prompts' common system turn runs once per batch.
    from finetune.measure import prefix_sharing

    prefixes = []
    real = prefix_sharing.common_prefix
    monkeypatch.setattr(prefix_sharing, "common_prefix", lambda rows: prefixes.append(real(rows)) or prefixes[-1])
    model, tokenizer = load(section)
    spec = write_task(tmp_path / "mc", "original", 0)
    write_jsonl(tmp_path / "mc" / "original.jsonl", [{**r, "item": " ".join([r["item"]] * (1 + i % 3))}
                                                     for i, r in enumerate(task_rows(0))])
    # Options of one token and of several lengths.
    choices = [ANSWERS[0], ANSWERS[1] + " " + ANSWERS[2], " ".join(ANSWERS[1:]), ANSWERS[3]]
    spec.write_text(spec.read_text().replace(json.dumps(ANSWERS), json.dumps(choices)))
    spec = str(spec)
    lengths = {len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in choices}
    assert 1 in lengths and len(lengths - {1}) >= 2
    own, shared = (evaluate_tasks(model, tokenizer, [spec], batch_size=4, limit=None, chat=chat, share_prefixes=s)[spec]
                   for s in (False, True))
    assert prefixes and (min(prefixes) >= prefix_sharing.MIN_PREFIX if chat else max(prefixes) == 0)
    # In one pass (above) and in several, the batches cut by the rows' lengths: lm-eval's scores either way.
    monkeypatch.setattr(prefix_sharing, "TOKENS_PER_PASS", 64)
    apart = evaluate_tasks(model, tokenizer, [spec], batch_size=4, limit=None, chat=chat, share_prefixes=True)[spec]

    def lls(score):
        return [[float(r[0][0]) for r in s["resps"]] for s in score.log["original"]["samples"]]

    def greedy(score):
        return [[r[0][1] for r in s["resps"]] for s in score.log["original"]["samples"]]

    for ours in (shared, apart):
        assert len(lls(ours)) == len(ITEMS)
        assert [x for q in lls(ours) for x in q] == pytest.approx([x for q in lls(own) for x in q], abs=1e-4)
        assert ours.examples == own.examples and ours.answers == own.answers
        assert greedy(ours) == greedy(own)  # lm-eval's is_greedy


def test_shared_prefixes_generate_what_lm_evals_own_path_generates(section, tmp_path, monkeypatch):
    # In the chat template every prompt begins with the same system turn: that prefix is encoded once per batch,
    # the rows are laid out as prefix, padding, rest, and greedy generation must give lm-eval's own replies.
    from finetune.measure import prefix_sharing

    task = str(write_generation_task(tmp_path / "gen"))
    # Prompts of several lengths, so that every batch is left-padded and the rows must be laid out anew.
    write_jsonl(tmp_path / "gen" / "gen.jsonl", [{"item": " ".join([r["item"]] * (1 + i % 3)), "answer": ANSWERS[r["label"]]}
                                                for i, r in enumerate(task_rows(0))])
    model, tokenizer = load(section)
    calls = []
    real = prefix_sharing.generate_with_shared_prefix
    monkeypatch.setattr(prefix_sharing, "generate_with_shared_prefix", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    own, shared = (evaluate_tasks(model, tokenizer, [task], batch_size=4, limit=None, chat=True, share_prefixes=s)[task]
                   for s in (False, True))
    assert len(calls) == len(ITEMS) // 4  # every batch went through it
    prompts = [tokenizer(s["arguments"][0][0], add_special_tokens=False)["input_ids"]
               for s in own.log["gen"]["samples"]]
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert common >= 8  # long enough to be shared, not left to lm-eval's path
    replies = [[s["resps"] for s in score.log["gen"]["samples"]] for score in (own, shared)]
    assert replies[0] == replies[1] and shared.examples == own.examples  # the whole replies, not only first words
    assert len({str(r) for r in replies[0]}) > 1  # replies that differ by prompt: the comparison is not vacuous


@pytest.mark.parametrize("kind", ["multiple_choice", "generation"])
def test_a_prefix_batches_share_runs_once_per_evaluation_and_changes_no_score(section, tmp_path, monkeypatch, kind):
    # In the chat template every prompt begins with the same system turn; at 4 rows per batch, 4 batches share it
    # (with a token of the question more where a batch's rows begin alike).
    from finetune.measure import prefix_sharing

    task = str(write_generation_task(tmp_path / "gen") if kind == "generation" else
               write_task(tmp_path / "mc", "original", 0))
    if kind == "multiple_choice":  # 4 questions per pass, as generation's batches hold 4
        monkeypatch.setattr(prefix_sharing, "TOKENS_PER_PASS", 4 * 40)
    leads = []
    real = prefix_sharing.common_prefix
    monkeypatch.setattr(prefix_sharing, "common_prefix",
                        lambda rows: leads.append(tuple(rows[0][:real(rows)])) or len(leads[-1]))
    model, tokenizer = load(section)
    one_row = []  # the inputs of every forward pass of one row: a prefix's own pass is one
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: one_row.append(tuple(kwargs["input_ids"][0].tolist()))
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[0] == 1 else None, with_kwargs=True)
    try:
        apart = evaluate_tasks(model, tokenizer, [task], batch_size=4, limit=None, chat=True, share_prefixes=True)
        rows_apart, one_row[:] = list(one_row), []
        with prefix_sharing.kept_prefixes():
            kept = [evaluate_tasks(model, tokenizer, [task], batch_size=4, limit=None, chat=True,
                                   share_prefixes=True) for _ in range(2)]
    finally:
        hook.remove()
    distinct = {lead for lead in leads if lead}
    passes_apart = [r for r in rows_apart if r in distinct]
    # Once in the scope for both evaluations, where each batch ran its prefix before.
    assert len(passes_apart) > len(distinct) and sorted(r for r in one_row if r in distinct) == sorted(distinct)
    for score in kept:
        assert score[task].examples == apart[task].examples
        assert [s["resps"] for s in score[task].log[Path(task).stem]["samples"]] == \
            [s["resps"] for s in apart[task].log[Path(task).stem]["samples"]]


@pytest.mark.parametrize("flags, setting, chosen", [
    (set(), "auto", None), ({"amx_bf16", "amx_tile"}, "auto", torch.bfloat16),
    ({"avx512_bf16"}, "auto", torch.bfloat16),
    ({"amx_bf16"}, "no", None), (set(), "bf16", torch.bfloat16)])
def test_evaluation_precision_follows_the_cpus_bf16_units_unless_the_recipe_says(monkeypatch, flags, setting, chosen):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    dtype, why = precision.eval_autocast(setting, torch.device("cpu"))
    assert dtype == chosen
    assert ("amx_bf16" in why) == ("amx_bf16" in flags and setting == "auto")
    assert ("slower" in why) == (not flags and setting != "no")  # bf16 where it is emulated is named as slower


def test_an_evaluation_casts_frozen_weights_once_and_gives_the_same_logits(section):
    # Autocast keeps its bf16 copy of a weight only while the weight requires grad: cast_once marks frozen weights
    # so for the region, which must change nothing in the results and leave every flag as it was.
    model, _ = load(section)
    frozen = {name for name, p in model.named_parameters() if "layers.0." in name}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    ids = torch.tensor([[3, 5, 7, 11, 13, 2, 4]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits
    with torch.no_grad(), precision.cast_once(torch.bfloat16, model):
        flags = {name for name, p in model.named_parameters() if p.requires_grad}
        once = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert torch.equal(plain, once) and torch.equal(once, again) and plain.dtype == torch.bfloat16
    assert flags == {name for name, _ in model.named_parameters()}  # all marked for the region ...
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen  # ... and put back
    with precision.cast_once(None, model):  # no autocast asked: nothing changes
        assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_an_adapter_is_evaluated_merged_and_every_weight_is_put_back_to_the_bit(section, tasks, drift_file):
    import peft

    from finetune.model import adapter_merged, lora_layers

    model, tokenizer = load(section)
    base_logits = model(input_ids=torch.tensor([[3, 5, 7, 11, 13, 2, 4]])).logits.detach()
    torch.manual_seed(0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    for layer, name in lora_layers(lora):  # B starts at 0: an adapter that has learned something
        torch.nn.init.normal_(layer.lora_B[name].weight, std=0.05)
    before = {name: p.detach().clone() for name, p in lora.named_parameters()}
    ids = torch.tensor([[3, 5, 7, 11, 13, 2, 4]])
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        with adapter_merged(lora) as merged:
            assert merged and all(layer.merged for layer, _ in lora_layers(lora))
            inside = lora(input_ids=ids).logits
            with lora.disable_adapter():  # peft unmerges a merged layer itself when it runs disabled
                disabled = lora(input_ids=ids).logits
    torch.testing.assert_close(inside, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=1e-5)
    assert (inside - base_logits).abs().max() > 1e-2  # the adapter does change the logits: the check means something
    assert not any(layer.merged for layer, _ in lora_layers(lora))
    assert all(torch.equal(p, before[name]) for name, p in lora.named_parameters())  # W + BA - BA is not W

    # Through a whole evaluation too; and an adapter peft will not merge (not finite) is measured as it is.
    fe = ForgettingEval(EvalSection(tasks=[str(tasks["original"])], drift_texts=[str(drift_file)]), section, tokenizer)
    fe.evaluate_base(lora)
    fe.evaluate(lora, step=1)
    assert all(torch.equal(p, before[name]) for name, p in lora.named_parameters())
    layer, name = lora_layers(lora)[-1]
    layer.lora_B[name].weight.data[0, 0] = float("nan")
    with adapter_merged(lora) as merged:
        assert not merged and not any(layer.merged for layer, _ in lora_layers(lora))
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters() if "lora_B" not in n)
    with adapter_merged(model.__class__(model.config)) as merged:  # no adapter: nothing to merge
        assert not merged


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_the_drifts_base_head_is_the_bases_also_where_the_adapter_trains_the_head(section, tasks):
    import copy

    import peft

    fe = ForgettingEval(EvalSection(tasks=[str(tasks["original"])]), section, load(section)[1])
    hidden = torch.randn(1, 5, load(section)[0].config.hidden_size)
    for trained_head in (False, True):
        model, _ = load(section)
        base_head = copy.deepcopy(output_layer(model))
        lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                          modules_to_save=["lm_head"] if trained_head else None))
        if trained_head:  # the run trained its own copy of the output layer
            with torch.no_grad():
                output_layer(lora).modules_to_save["default"].weight.add_(0.1)
        head = fe._base_head_for(lora)
        with torch.no_grad():
            assert torch.equal(head(hidden), base_head(hidden))
            assert torch.equal(output_layer(lora)(hidden), base_head(hidden)) != trained_head
        assert (head is output_layer(lora)) != trained_head  # peft is switched off only where it must be


def test_bf16_evaluation_runs_every_forward_pass_in_bf16_and_caches_the_base_apart(section, tmp_path, drift_file,
                                                                                  monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", set)  # `auto` means no autocast on any machine running this
    monkeypatch.setattr(evaluate, "PROMPTS", {"text": ["The weather today is"], "chat": ["Say hello."]})
    monkeypatch.setattr(evaluate, "NEW_TOKENS", 4)
    runs = []
    real = evaluate.evaluate_loaded
    monkeypatch.setattr(evaluate, "evaluate_loaded", lambda *a, **k: runs.append(k["autocast"]) or real(*a, **k))
    model, tokenizer = load(section)
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    tasks = [str(write_task(tmp_path / "mc", "original", 0)), str(write_generation_task(tmp_path / "gen"))]

    def measure(setting: str):
        seen.clear()
        fe = ForgettingEval(EvalSection(tasks=tasks, limit=4, drift_texts=[str(drift_file)], mixed_precision=setting),
                            section, tokenizer)
        base = fe.evaluate_base(model)
        measured = set(seen)
        seen.clear()
        tuned = fe.evaluate(model, step=1)
        shown = render_markdown(build_report(base, tuned, max_drop=0.0, curve=[], final_note="",
                                             provenance=provenance(None, fe.precision)))
        assert f"- **evaluation**: {fe.precision}" in shown  # what was chosen, and why, in the report's footer
        return base, tuned, measured, set(seen)

    # The base's drift texts are sampled (once, cached, whatever the setting) by the first of these.
    _, _, _, in_tuned = measure("no")
    assert in_tuned == {torch.float32} and runs == [None, None]  # the base's tasks, then the tuned model's
    base, tuned, in_base, in_tuned = measure("bf16")
    assert in_base == in_tuned == {torch.bfloat16}  # tasks and drift alike
    assert runs == [None, None, torch.bfloat16, torch.bfloat16]  # the base measured again: not the float32 entry
    assert tuned.drift["text"].kl == 0.0 and tuned.drift["chat"].kl == 0.0  # same weights, same autocast
    assert [tuned.tasks[t].examples for t in tasks] == [base.tasks[t].examples for t in tasks]
    _, _, in_base, in_tuned = measure("auto")
    assert not in_base and in_tuned == {torch.float32}  # `auto` chose no autocast here: the first cache entry
    assert runs == [None, None, torch.bfloat16, torch.bfloat16, None]  # the tuned model's tasks alone
