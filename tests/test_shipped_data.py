"""Mitigations are judged on data they were not shaped around: no shipped replay, KL or Fisher row (data/general/)
repeats or nearly repeats an item of a shipped evaluation suite (data/tasks/, data/new_task/ test items) or a
drift prompt."""

import difflib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEAR = 0.9  # difflib's ratio between normalised texts at or above which two prompts count as the same item


def normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def training_prompts() -> dict[str, str]:
    """Every user turn of every shipped replay/KL/Fisher file, by where it is."""
    out = {}
    for path in sorted((ROOT / "data" / "general").glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in json.loads(line)["messages"]:
                if m["role"] == "user":
                    out[f"{path.name} line {number}: {m['content']}"] = normalised(m["content"])
    return out


def evaluated_prompts() -> set[str]:
    items = set()
    for path in [*(ROOT / "data" / "tasks").glob("*.jsonl"), ROOT / "data" / "new_task" / "test.jsonl"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            text = row.get("question") or row.get("prompt") or row["messages"][0]["content"]
            items.add(normalised(text))
    drift = json.loads((ROOT / "finetune" / "measure" / "drift_prompts.json").read_text(encoding="utf-8"))
    return items | {normalised(p if isinstance(p, str) else json.dumps(p)) for kind in drift.values() for p in kind}


def test_no_replay_kl_or_fisher_row_repeats_or_nearly_repeats_an_evaluated_prompt():
    trained, evaluated = training_prompts(), evaluated_prompts()
    assert len(trained) > 50 and len(evaluated) > 300  # the files were found
    close = [(where, other) for where, text in trained.items() for other in evaluated
             if difflib.SequenceMatcher(None, text, other).quick_ratio() >= NEAR
             and difflib.SequenceMatcher(None, text, other).ratio() >= NEAR]
    assert not close, close[:5]


def test_the_check_sees_a_near_repeat():
    # The same item in other case and punctuation is caught; the same template asking something else is not.
    a, b = normalised("What is the capital of France?"), normalised("what's the capital of france")
    c = normalised("What is the capital of Peru?")
    assert difflib.SequenceMatcher(None, a, b).ratio() >= NEAR > difflib.SequenceMatcher(None, a, c).ratio()
