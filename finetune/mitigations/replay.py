"""Replay: mix old (original-task or general) data into the training stream until it makes `data.replay.ratio` of the
training tokens (Bethune et al. 2025: about 1% of pretraining data prevented forgetting)."""

from __future__ import annotations

import random

from ..data import encode_weighted


def label(recipe) -> str | None:
    return f"replay {recipe.data.replay.ratio:.0%}" if recipe.data.replay else None


def mix(recipe, train, tokenizer, stats):
    """Replay examples, drawn at random with the run's seed (repeating once all are used), until they make `ratio`
    of all training tokens. Bad replay rows are handled and counted in `stats` like training rows."""
    section = recipe.data.replay
    if section is None:
        return None
    replay = encode_weighted(section.datasets, tokenizer, recipe.data, stats, recipe.train.seed)
    wanted = section.ratio / (1 - section.ratio) * sum(len(t) for t in train["input_ids"])
    lengths = [len(t) for t in replay["input_ids"]]
    rng = random.Random(recipe.train.seed)
    picked, total = [], 0
    while total < wanted:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for i in order:
            if total >= wanted:
                break
            picked.append(i)
            total += lengths[i]
    return replay.select(picked)
