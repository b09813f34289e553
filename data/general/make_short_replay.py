"""Writes short_replay.jsonl: short instructions with one-word or number answers, answered by the base model
itself after three example turns, for `data.replay`.

The demo's new task teaches a one-word answer format (a Zorblax bin) that takes over every short prompt. The base
answers short instructions in one word only after a few example turns (zero-shot it answers in a sentence, and
replaying those sentences teaches the wrong format), so each row is three example turns written here, then the
prompt, then the base's own greedy reply; rows whose reply is not one word are left out. The prompts and example
turns were written for this project; tests/test_shipped_data.py checks that none repeats or nearly repeats an item of
the evaluation suites or a drift prompt.

    python data/general/make_short_replay.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHOTS = [("Name a fruit that is yellow. One word only.", "banana"),
         ("Write the word \"river\" and nothing else.", "river"),
         ("Add 13 and 20. Reply with digits only.", "33")]
PROMPTS = [
    "Write the word \"meadow\" and nothing else.",
    "Give back only this word: \"silver\".",
    "Say \"thanks\" and stop.",
    "Output the single word \"window\".",
    "Which is larger, 7 or 4? Reply with the number only.",
    "How many arms does an octopus have? Answer with a number.",
    "What is 6 minus 2? Give only the number.",
    "What is 3 times 3? Number only.",
    "Is the sun a planet? Answer yes or no.",
    "Can fish swim? Reply yes or no.",
    "Which is wetter, a lake or a desert? One word.",
    "What is the opposite of \"early\"? One word only.",
    "Name the color of grass in one word.",
    "What animal says \"moo\"? One word.",
    "Write the word \"cat\" in capital letters only.",
    "Spell the word \"dog\" backwards, nothing else.",
    "What is the first letter of \"apple\"? Just the letter.",
    "What is the last word of \"the quick brown fox\"? Only that word.",
    "What do cows drink? One word.",
    "Which month comes after March? One word.",
    "What do you sit on at a table? One word.",
    "Which is colder, snow or soup? One word.",
    "Echo this word exactly: \"lantern\".",
    "Return only the word \"pencil\".",
    "Say the word \"orange\" once.",
    "How many wheels does a tricycle have? Number only.",
    "What is 10 divided by 2? Only the number.",
    "Is a tomato red when ripe? Yes or no.",
    "Is Tuesday a month? Yes or no.",
    "Which is heavier, a car or a feather? One word.",
    "Name the season after winter. One word.",
    "What is the plural of \"mouse\"? One word.",
    "Give a synonym of \"big\" in one word.",
    "Complete with one word: \"salt and ...\"",
    "Write the number twelve as digits only.",
    "Reply with the word \"done\".",
    "Respond with only \"okay\".",
    "What do you call a baby dog? One word.",
]
ONE_WORD = re.compile(r"[\w\"'.!-]+")  # the base's reply in the format to keep: one word, no sentence


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.files import atomic_write_text
    from finetune.model import resolve_model_path
    from finetune.recipe import ModelSection

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--out", type=Path, default=HERE / "short_replay.jsonl")
    args = p.parse_args()

    path = resolve_model_path(ModelSection(path=args.model))  # a GGUF file is converted once and cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    shots = [m for q, a in SHOTS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    rows = []
    for prompt in PROMPTS:
        messages = [*shots, {"role": "user", "content": prompt}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        reply = reply.split("\n")[0]
        if ONE_WORD.fullmatch(reply):
            rows.append({"messages": [*messages, {"role": "assistant", "content": reply}]})
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} of {len(PROMPTS)} prompts answered in one word -> {args.out}")


if __name__ == "__main__":
    main()
