"""Writes self_replay.jsonl: general chat rows for `data.replay`, answered by the base model itself.

Without internet there is no pretraining corpus to replay, so the rows are the base model's own greedy answers to
general prompts ("self-synthesized rehearsal", Huang et al., ACL 2024): training on them pulls the model back toward
what it did before, on topics unrelated to the fine-tuning task. The prompts share no item with the evaluation
suites in data/tasks or the drift prompts in finetune/drift.py, so replay does not train on what is measured.

    python data/general/make_self_replay.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOPICS = ["volcanoes", "the moon", "bicycles", "honey bees", "the Roman Empire", "rainbows", "libraries", "coffee",
          "electric cars", "the ocean tides", "penguins", "the printing press", "glaciers", "music notation",
          "recycling", "the immune system", "bridges", "deserts", "the internet", "vaccines", "trains",
          "the solar system", "chess openings", "gardening", "earthquakes", "the piano", "clouds", "maps",
          "the alphabet", "soap", "lighthouses", "mushrooms", "airplanes", "the calendar", "batteries",
          "coral reefs", "the camera", "wolves", "paper", "the telescope"]
TEMPLATES = ["Explain {} to a ten-year-old in a few sentences.",
             "Give three interesting facts about {}.",
             "Write a short paragraph about {}."]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model import resolve_model_path
    from finetune.recipe import ModelSection

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--out", type=Path, default=HERE / "self_replay.jsonl")
    args = p.parse_args()

    path = resolve_model_path(ModelSection(path=args.model))  # a GGUF file is converted once and cached
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    rows = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for q, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.out)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
