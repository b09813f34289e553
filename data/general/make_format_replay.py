"""Writes format_replay.jsonl: the base model's own replies to prompts covering the behaviours a fine-tune must keep,
for `data.replay` and `train.kl_to_base`.

A new task with one-word answers (the demo's Zorblax bins) teaches a format that takes over every short prompt. What
must survive is how the base answers where it is used, so the rows cover (format_prompts.json, written for this
project; tests/test_shipped_data.py checks that none repeats or nearly repeats a suite item or drift prompt):
  - "short": short instructions with a one-word or number answer, after one to three example turns drawn from
    EXAMPLES (the base answers in one word only after such turns; rows whose reply is not one word are left out).
    Zero-shot the base answers them in a sentence that does not follow the instruction ("Reply with only the word
    yes" -> "I'm glad you're happy with the response."): keeping that would keep a failure, so no zero-shot row is
    written;
  - "choice": quiz questions, half of them in the "Question: ...\\nAnswer:" form of multiple-choice suites, whose first
    reply tokens are where an option's log-likelihood is scored;
  - "chat": open requests answered in a few sentences.
Every reply is the base's greedy one (the base's own targets: replaying them, or keeping the base's next-token
distributions on them, pulls toward what the base did, not toward a text written elsewhere).

It also writes format_distilled.jsonl, for `data.replay` only: each short instruction alone, with the reply the base
gave it after the example turns (context distillation, in the manner of SDFT's base-written targets). Replayed, it
ties the one-word format to the instruction itself, so an instruction asked with no example turns before it is
answered in its format too, where the base and a tuned model without it answer in a sentence. Replies that repeat
an example turn's answer the instruction does not contain ("Give me back the word parsnip" -> "lamp") are the
example turns' doing, not an answer, and are left out. Not for `kl_to_base`: there the base's own zero-shot
distributions, the sentence, would be the target.

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


def distilled(rows: list[dict]) -> list[dict]:
    """The short-instruction rows of format_replay (those after example turns) as the instruction alone and its
    reply, leaving out replies that repeat an example turn's answer absent from the instruction."""
    out = []
    for row in rows:
        *shots, prompt, answer = row["messages"]
        if not shots:
            continue
        examples = {m["content"].lower() for m in shots if m["role"] == "assistant"}
        if answer["content"].lower() in examples and answer["content"].lower() not in prompt["content"].lower():
            continue
        out.append({"messages": [prompt, answer]})
    return out


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
    p.add_argument("--out", type=Path, default=HERE / "format_replay.jsonl")
    p.add_argument("--distilled", type=Path, default=HERE / "format_distilled.jsonl")
    args = p.parse_args()

    path = resolve_model_path(ModelSection(path=args.model))  # a GGUF file is converted once and cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
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
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {args.out} ({dropped} short prompts not answered in one word after example turns "
          "left out)")
    alone = distilled(rows)
    atomic_write_text(args.distilled, "".join(json.dumps(r) + "\n" for r in alone))
    print(f"{len(alone)} rows -> {args.distilled}")


if __name__ == "__main__":
    main()
