"""Writes the base model's own replies to prompts covering the behaviours a fine-tune must keep: format_kl.jsonl for
`train.kl_to_base`, format_replay.jsonl and format_distilled.jsonl for `data.replay`.

A new task with one-word answers (the demo's Zorblax bins) teaches a format that takes over every short prompt. What
must survive is how the base answers where it is used, so the rows cover (format_prompts.json, written for this
project; tests/test_shipped_data.py checks that none repeats or nearly repeats a suite item or drift prompt):
  - "short": short instructions with a one-word or number answer, after one to three example turns drawn from
    EXAMPLES (the base answers in one word only after such turns; rows whose reply is not one word are left out).
    Zero-shot the base answers them in a sentence that does not follow the instruction ("Reply with only the word
    yes" -> "I'm glad you're happy with the response."): keeping that would keep a failure, so no zero-shot row is
    written;
  - "choice": quiz questions, half of them in the "Question: ...\\nAnswer:" form of multiple-choice suites, whose
    first reply tokens are where an option's log-likelihood is scored;
  - "chat": open requests answered in a few sentences.
Every reply is the base's greedy one (the base's own targets: keeping the base's next-token distributions on them,
or replaying them, pulls toward what the base did, not toward a text written elsewhere).

The files differ in which short replies they hold, because the two uses differ:
  - format_kl.jsonl, every row: the KL keeps the base's whole next-token distribution at those positions, wherever
    its greedy reply was wrong, so nothing is sharpened;
  - format_replay.jsonl, the rows whose short reply is right (`short_answers`, written with the prompts; a word given
    in capitals must be matched in capitals). Replay trains on the greedy reply itself, and the base's wrong replies
    are mostly biases: it copies a word of the prompt ("Opposite of noisy?" -> "noisy") and says "yes" to yes/no
    questions (15 yes to 7 no in its replies). Replayed, they are what a fine-tune learns first: at lr 3e-3 a
    tuned model answered "yes" to 22 no-questions its base got right and "Italy" to "What is the capital of Italy?". Yes/no
    replies are also balanced, as many "yes" as "no";
  - format_distilled.jsonl: each right short row's instruction alone with its reply (context distillation, in the
    manner of SDFT's base-written targets). Replayed, it ties the one-word format to the instruction itself, so an
    instruction asked with no example turns before it is answered in its format too, where the base and a tuned
    model without it answer in a sentence. Not for `kl_to_base`: there the base's own zero-shot distributions, the
    sentence, would be the target.

    python data/general/make_format_replay.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXAMPLES = [("Name a fruit that is yellow. One word only.", "banana"),
            ("Write the word \"river\" and nothing else.", "river"),
            ("Add 13 and 20. Reply with digits only.", "33"),
            ("Is ice cold? Yes or no.", "yes"),
            ("Which is bigger, a mouse or a whale? One word.", "whale"),
            ("Type the word \"lamp\".", "lamp"),
            ("How many legs does a spider have? Digits only.", "8"),
            ("What colour is coal? One word.", "black")]
NEW_TOKENS = {"short": 8, "choice": 32, "chat": 64}
ONE_WORD = re.compile(r"[\w\"'.!-]+")  # a reply in the one-word format: no sentence
SEED = 0


def conversations(prompts: dict[str, list[str]], rng: random.Random) -> list[tuple[str, list[dict]]]:
    """(kind, messages up to the reply) for every row to write."""
    out = []
    for prompt in prompts["short"]:
        shots = rng.sample(EXAMPLES, rng.randint(1, 3))
        turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        out.append(("short", [*turns, {"role": "user", "content": prompt}]))
    for i, prompt in enumerate(prompts["choice"]):
        out.append(("choice", [{"role": "user", "content": f"Question: {prompt}\nAnswer:" if i % 2 else prompt}]))
    out += [("chat", [{"role": "user", "content": prompt}]) for prompt in prompts["chat"]]
    return out


def right(reply: str, answers: list[str]) -> bool:
    """Whether a one-word reply is one of the answers: trailing punctuation ignored, case too but where the answer or
    the reply is in capitals (uppercase, or lowercase, requested: "Turn HARVEST into lowercase" -> "HARVEST" is wrong)."""
    word = _bare(reply)
    return any(word == a if _capitals(a) or _capitals(word) else word.lower() == a.lower() for a in answers)


def _capitals(word: str) -> bool:
    return word.isupper() and len(word) > 1


def right_rows(rows: list[dict], answers: dict[str, list[str]]) -> list[dict]:
    """The rows but those whose short reply (after example turns) is not one of its prompt's answers, with as many
    "yes" as "no" replies (the first of each): more of one would teach the answer itself, whatever the question
    (measured: with 22 "yes" to 4 "no" replayed, a tuned model answered "yes" to 16 no-questions its base got
    right; balanced, 11)."""
    kept = [r for r in rows if len(r["messages"]) <= 2
            or right(r["messages"][-1]["content"], answers[r["messages"][-2]["content"]])]
    labels = [_bare(r["messages"][-1]["content"]).lower() if len(r["messages"]) > 2 else None for r in kept]
    each = min(labels.count("yes"), labels.count("no"))
    seen = {"yes": 0, "no": 0}
    out = []
    for row, label in zip(kept, labels):
        if label in seen:
            seen[label] += 1
            if seen[label] > each:
                continue
        out.append(row)
    return out


def _bare(reply: str) -> str:
    """A one-word reply without surrounding space and trailing punctuation."""
    return reply.strip().rstrip(".!")


def distilled(rows: list[dict]) -> list[dict]:
    """The short-instruction rows of format_replay (those after example turns) as the instruction alone and its
    reply."""
    return [{"messages": row["messages"][-2:]} for row in rows if len(row["messages"]) > 2]


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], new_tokens: int) -> str:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.files import atomic_write_text
    from finetune.model import resolve_model_path
    from finetune.recipe import ModelSection

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--prompts", type=Path, default=HERE / "format_prompts.json")
    p.add_argument("--out", type=Path, default=HERE, help="the folder to write the three files to")
    args = p.parse_args()

    path = resolve_model_path(ModelSection(path=args.model))  # a GGUF file is converted once and cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
    answers = dict(zip(prompts["short"], prompts["short_answers"], strict=True))
    rows, dropped = [], 0
    for kind, messages in conversations(prompts, random.Random(SEED)):
        text = reply(model, tokenizer, messages, NEW_TOKENS[kind])
        if kind == "short":
            text = text.split("\n")[0]
            if not ONE_WORD.fullmatch(text):
                dropped += 1
                continue
        if text:
            rows.append({"messages": [*messages, {"role": "assistant", "content": text}]})
    kept = right_rows(rows, answers)
    for name, written in (("format_kl.jsonl", rows), ("format_replay.jsonl", kept),
                          ("format_distilled.jsonl", distilled(kept))):
        atomic_write_text(args.out / name, "".join(json.dumps(r) + "\n" for r in written))
        print(f"{len(written)} rows -> {args.out / name}")
    print(f"({dropped} short prompts not answered in one word after example turns left out; "
          f"{len(rows) - len(kept)} wrong short replies left out of replay)")


if __name__ == "__main__":
    main()
