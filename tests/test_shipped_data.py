"""Mitigations are judged on data they were not shaped around: no shipped training, replay, KL or Fisher row
(data/general/, data/new_task/train.jsonl) repeats or nearly repeats an item of a shipped original-task suite
(data/tasks/) or a drift prompt, and no replay, KL or Fisher row repeats a target-task test item either."""

import difflib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEAR = 0.9  # difflib's ratio between normalised texts at or above which two prompts count as the same item


def normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def training_prompts(paths) -> dict[str, str]:
    """Every user turn of the given chat files, by where it is."""
    out = {}
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in json.loads(line)["messages"]:
                if m["role"] == "user":
                    out[f"{path.name} line {number}: {m['content']}"] = normalised(m["content"])
    return out


def evaluated_prompts(paths) -> set[str]:
    items = set()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            text = row.get("question") or row.get("prompt") or row["messages"][0]["content"]
            items.add(normalised(text))
    drift = json.loads((ROOT / "finetune" / "measure" / "drift_prompts.json").read_text(encoding="utf-8"))
    return items | {normalised(p if isinstance(p, str) else json.dumps(p)) for kind in drift.values() for p in kind}


SUITES = sorted((ROOT / "data" / "tasks").glob("*.jsonl"))
GENERAL = sorted((ROOT / "data" / "general").glob("*.jsonl"))


def near_repeats(trained: dict[str, str], evaluated: set[str]) -> list[tuple[str, str]]:
    """Pairs whose difflib ratio (trained text first) reaches NEAR. The bounds go cheapest first (lengths, then
    letter counts), and each evaluated text is analysed once (difflib caches its second sequence)."""
    close = []
    matcher = difflib.SequenceMatcher(None)
    for other in sorted(evaluated):
        matcher.set_seq2(other)
        for where, text in trained.items():
            matcher.set_seq1(text)
            if matcher.real_quick_ratio() >= NEAR and matcher.quick_ratio() >= NEAR and matcher.ratio() >= NEAR:
                close.append((where, other))
    return close


def test_no_replay_kl_or_fisher_row_repeats_or_nearly_repeats_an_evaluated_prompt():
    trained = training_prompts(GENERAL)
    evaluated = evaluated_prompts([*SUITES, ROOT / "data" / "new_task" / "test.jsonl"])
    assert len(trained) > 50 and len(evaluated) > 1200  # the files were found (three suites of 420 items)
    close = near_repeats(trained, evaluated)
    assert not close, close[:5]


def test_no_training_row_of_the_new_task_repeats_an_original_task_item():
    # The target task's own test items are left out here: its training rows share their templates by design.
    trained = training_prompts([ROOT / "data" / "new_task" / "train.jsonl"])
    close = near_repeats(trained, evaluated_prompts(SUITES))
    assert len(trained) > 300 and not close, close[:5]


def test_the_probe_prompts_repeat_no_suite_item_and_no_training_or_replay_row():
    # Probes measure the model during training (finetune/probes.py): a prompt it was trained on would show no drift.
    prompts = json.loads((ROOT / "finetune" / "probe_prompts.json").read_text(encoding="utf-8"))
    probes = {f"probe_prompts.json: {p}": normalised(p) for p in prompts}
    trained = training_prompts([*GENERAL, ROOT / "data" / "new_task" / "train.jsonl"])
    close = near_repeats(probes, evaluated_prompts(SUITES) | set(trained.values()))
    assert len(probes) >= 10 and not close, close[:5]


def test_the_check_sees_a_near_repeat():
    # The same item in other case and punctuation is caught; the same template asking something else is not.
    a, b = normalised("What is the capital of France?"), normalised("what's the capital of france")
    c = normalised("What is the capital of Peru?")
    assert difflib.SequenceMatcher(None, a, b).ratio() >= NEAR > difflib.SequenceMatcher(None, a, c).ratio()


def test_the_named_zorblax_rows_are_the_training_rows_that_name_zorblax():
    # recipes/demo-lora-format.yaml trains these without the system prompt as well: they must be the rows of the
    # training file whose question names the task, no more (no test item, no other row), no fewer.
    rows = (ROOT / "data" / "new_task" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    named = (ROOT / "data" / "new_task" / "train_named.jsonl").read_text(encoding="utf-8").splitlines()
    assert named == [r for r in rows if "zorblax" in json.loads(r)["messages"][0]["content"].lower()]
    assert 0 < len(named) < len(rows)


def test_replay_holds_the_right_short_replies_and_the_distilled_rows_are_them_without_their_example_turns():
    # make_format_replay.py: the KL file holds every row; replay only those whose short reply is one of the answers
    # written with its prompt (the base's wrong replies are its biases: copying a word of the prompt, "yes" to any
    # question); format_distilled.jsonl is each of those without its example turns.
    import sys

    sys.path.insert(0, str(ROOT / "data" / "general"))
    from make_format_replay import distilled, right, right_rows

    def rows(name: str) -> list[dict]:
        return [json.loads(r) for r in (ROOT / "data" / "general" / name).read_text(encoding="utf-8").splitlines()]

    prompts = json.loads((ROOT / "data" / "general" / "format_prompts.json").read_text(encoding="utf-8"))
    answers = dict(zip(prompts["short"], prompts["short_answers"], strict=True))
    every, replay = rows("format_kl.jsonl"), rows("format_replay.jsonl")
    assert replay == right_rows(every, answers) and 10 < sum(len(r["messages"]) > 2 for r in replay) < len(replay)
    assert len(every) > len(replay)  # wrong replies were there to leave out
    assert rows("format_distilled.jsonl") == distilled(replay)
    assert all(len(r["messages"]) == 2 for r in rows("format_distilled.jsonl"))
    assert right("Paris.", ["paris"]) and not right("planet", ["PLANET"]) and not right("noisy", ["quiet"])
    assert not right("HARVEST", ["harvest"]), "a word left in capitals where lowercase was asked for is wrong"
