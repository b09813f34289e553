"""`finetune preview RECIPE`: the training data as the model will see it, before any training. Each shown example is
rendered as text with the tokens that are trained on marked, and the packing statistics say how the examples fill
rows of `data.max_length` tokens (as axolotl's `preprocess --debug` shows which tokens are trained)."""

from __future__ import annotations

from .data import RowDataset, build_datasets
from .model_files import load_tokenizer
from .recipe import Recipe

GREEN, RESET = "\033[1;32m", "\033[0m"


def _runs(target: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, trained) for each stretch of tokens that are all trained or all not."""
    runs, start = [], 0
    for i in range(1, len(target) + 1):
        if i == len(target) or bool(target[i]) != bool(target[start]):
            runs.append((start, i, bool(target[start])))
            start = i
    return runs


def render(tokenizer, ids: list[int], target: list[int], color: bool) -> str:
    """The example's text; trained tokens in green on a terminal, else between [[ and ]]."""
    parts = []
    for start, end, trained in _runs(target):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        parts.append(text)
    return "".join(parts)


def preview(recipe: Recipe, rows: int, color: bool) -> str:
    from . import mitigations

    data = recipe.data
    tokenizer = load_tokenizer(recipe.model, data.chat_template)
    train, _, stats = build_datasets(data, tokenizer, recipe.train.seed)
    train = mitigations.mix(recipe, train, tokenizer, stats)
    legend = "trained tokens in green" if color else "trained tokens between [[ and ]]"
    out = [f"The first {min(rows, len(train))} of {len(train)} training examples ({legend}; data.train_on: "
           f"{data.train_on}):", ""]
    for i in range(min(rows, len(train))):
        example = train[i]
        ids, target = example["input_ids"], example["target"]
        out += [f"--- example {i}: {len(ids)} tokens, {sum(target[1:])} trained"
                f"{' (truncated to data.max_length)' if len(ids) >= data.max_length else ''}",
                render(tokenizer, ids, target, color), ""]
    packed = RowDataset(train, data.max_length, data.packing)
    lengths = [len(ids) for ids in train["input_ids"]]
    fill = stats.tokens / (len(packed) * data.max_length) if len(packed) else 0.0
    mixed = f"; {stats.mixed_examples} added by {' and '.join(stats.mixed_by)}" if stats.mixed_examples else ""
    out += ["packing:" if data.packing else "rows (packing off: one example per row):",
            f"  examples   {stats.examples:,}{mixed} ({stats.skipped} bad rows skipped)",
            f"  tokens     {stats.tokens:,}, of which trained {stats.target_tokens:,} "
            f"({stats.target_tokens / max(stats.tokens, 1):.0%})",
            f"  lengths    {min(lengths)} to {max(lengths)} tokens, mean {sum(lengths) / len(lengths):.0f}",
            f"  truncated  {stats.truncated} example(s) longer than data.max_length={data.max_length}",
            f"  rows       {len(packed):,} of {data.max_length} tokens, {fill:.0%} filled",
            f"  updates    {len(packed) // (recipe.train.batch_size * recipe.train.grad_accum):,} per epoch on one "
            f"process (batch_size {recipe.train.batch_size} x grad_accum {recipe.train.grad_accum})"]
    return "\n".join(out)
