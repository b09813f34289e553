"""Datasets in, token rows out: loading, the three formats, target masking, packing and collation.

An encoded example is `input_ids` plus `target` (1 where the token is something to learn). Rows are lists
of example indices: one example per row without packing, several with it. The collator shifts labels
inside each example, so no example ever predicts the first token of the next one.
"""

from __future__ import annotations

import bisect
import codecs
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets, load_dataset

from . import attention
from .errors import UserError
from .quiet import progress_bars
from .recipe import LOCAL_BUILDERS, DataSection, DatasetSpec

IGNORE = -100
_ROLES = {"system", "user", "assistant", "tool"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(UserError):
    """A dataset that cannot be used as the recipe says; the message names the file, row and fix."""


@dataclass
class DataStats:
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    mixed_examples: int = 0  # added by data-side mitigations (replay)
    mixed_tokens: int = 0
    mixed_by: list[str] = field(default_factory=list)  # their names
    target_tokens: int = 0
    tokens: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- loading


def load_rows(spec: DatasetSpec) -> Dataset:
    """The raw rows of one dataset, local file or hub."""
    suffix = Path(spec.path).suffix.lower()
    try:
        if suffix in LOCAL_BUILDERS and Path(spec.path).is_file():
            if Path(spec.path).stat().st_size == 0:
                raise DataError(f"{spec.path} is empty; it needs at least one row.")
            if suffix != ".parquet":
                _check_utf8(Path(spec.path))  # pyarrow's JSON reader lets bad bytes through to tokenization
            return load_dataset(LOCAL_BUILDERS[suffix], data_files=spec.path, split="train")
        return load_dataset(spec.path, spec.name, split=spec.split)
    except DataError:
        raise
    except Exception as e:  # datasets wraps parse errors in many types; the message is what helps
        raise DataError(f"could not read {spec.path}: {type(e).__name__}: {e}") from None


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: e.start].count(b"\n")
                raise DataError(f"{path} is not valid UTF-8 at line {line}; re-save the file as UTF-8.") from None
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path} ends in the middle of a UTF-8 character; the file looks cut short.") from None


# ---------------------------------------------------------------- the formats


def _check_text(row: dict) -> str:
    text = row["text"]
    return "" if isinstance(text, str) and text.strip() else "`text` must be a non-empty string"


def _check_instruction(row: dict) -> str:
    if not (isinstance(row["instruction"], str) and row["instruction"].strip()):
        return "`instruction` must be a non-empty string"
    if not (isinstance(row["output"], str) and row["output"].strip()):
        return "`output` must be a non-empty string"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return "`input` must be a string when given"
    return ""


def _check_chat(row: dict) -> str:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not (
                isinstance(m.get("role"), str) and m["role"] in _ROLES):
            return f"`messages[{i}]` must be {{role: one of {sorted(_ROLES)}, content: string}}"
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            return f"`messages[{i}].weight` must be 0 or 1, on an assistant turn (0: context, not learned)"
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        return "`messages` has no assistant turn to learn"
    if not any(m.get("weight", 1) for m in assistant):
        return "`messages` has no assistant turn to learn (every one has weight 0)"
    return ""


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the assistant turns to learn: all of them but those
    marked `weight: 0` (OpenAI's fine-tuning format), which stay context, e.g. example turns before the real one."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        # The last turn's render is the whole conversation's: one Jinja render fewer per row.
        through = text if i == len(messages) - 1 else tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError("the chat template renders a conversation differently from its prefixes, so assistant "
                            "turns cannot be located; give `data.chat_template` a template without lookahead.")
        spans.append((len(before), len(through)))
    return text, spans


def _encode_text(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def _encode_chat(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    text, spans = _render_chat(tokenizer, row["messages"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # A token is a target if it starts inside an assistant span; offsets are sorted, so each span is a slice.
    starts = [start for start, _ in enc["offset_mapping"]]
    target = [0] * len(ids)
    for s, e in spans:
        lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
        target[lo:hi] = [1] * (hi - lo)
    return ids, target


def _encode_instruction(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        return _encode_chat(tokenizer, {"messages": messages})
    # No chat template (a base model): the Alpaca layout, prompt then response and EOS.
    template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
    prompt_ids = tokenizer(template.format(instruction=row["instruction"], input=row.get("input")),
                           add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids)


@dataclass(frozen=True)
class Format:
    fields: tuple[str, ...]  # our names for a row's fields; `columns` in a recipe maps them to the dataset's
    optional: tuple[str, ...]  # fields a dataset may lack
    check: Callable[[dict], str]  # why a row cannot be used ("" if it can)
    encode: Callable[[Any, dict], tuple[list[int], list[int]]]  # (tokenizer, row) -> input_ids, target
    needs_chat_template: bool = False


# The one table of data formats: recipe.DatasetSpec.format allows exactly these names (tested).
FORMATS = {
    "text": Format(("text",), (), _check_text, _encode_text),
    "instruction": Format(("instruction", "input", "output"), ("input",), _check_instruction, _encode_instruction),
    "chat": Format(("messages",), (), _check_chat, _encode_chat, needs_chat_template=True),
}


def with_system(row: dict, system: str) -> tuple[dict, str]:
    """A chat row with `system` as its first message (DatasetSpec.system), or why it cannot take one."""
    messages = row["messages"]
    if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return row, "the row has a system message of its own, which the dataset's `system` would contradict"
    return {**row, "messages": [{"role": "system", "content": system}, *messages]}, ""


def make_encoder(tokenizer, fmt: str, columns: dict[str, str], max_length: int, train_on: str,
                 system: str | None = None):
    """A batched `datasets.map` function: rows in, `input_ids`/`target`/`error`/`truncated` out."""
    spec = FORMATS[fmt]
    names = {f: columns.get(f, f) for f in spec.fields}

    def encode(batch: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "target": [], "error": [], "truncated": [], "row": []}
        for j, index in enumerate(indices):
            row = {f: batch[col][j] if col in batch else None for f, col in names.items()}
            error = spec.check(row)
            if not error and system is not None:
                row, error = with_system(row, system)
            ids, target = ([], []) if error else spec.encode(tokenizer, row)
            if train_on == "all":
                target = [1] * len(ids)
            if not error and not any(target[1:max_length]):
                error = f"no target tokens within data.max_length={max_length}"
            out["input_ids"].append(ids[:max_length])
            out["target"].append(target[:max_length])
            out["truncated"].append(len(ids) > max_length)
            out["error"].append(error)
            out["row"].append(index)
        return out

    return encode


def encode_dataset(spec: DatasetSpec, tokenizer, data: DataSection, stats: DataStats) -> Dataset:
    raw = load_rows(spec)
    fmt = FORMATS[spec.format]
    if fmt.needs_chat_template and not tokenizer.chat_template:
        raise DataError(f"{spec.path}: format `{spec.format}` needs a chat template; the tokenizer has none, so set "
                        "`data.chat_template` or use format `instruction`.")
    names = [spec.columns.get(f, f) for f in fmt.fields if f not in fmt.optional]
    missing = [n for n in names if n not in raw.column_names]
    if missing:
        raise DataError(f"{spec.path}: column(s) {missing} missing for format `{spec.format}`; it has "
                        f"{raw.column_names}. Map them with `columns: {{{fmt.fields[0]}: your_column}}`.")
    encoder = make_encoder(tokenizer, spec.format, spec.columns, data.max_length, data.train_on, spec.system)
    # The main process tokenizes alone (the other ranks wait, then read datasets' cache): every core is free.
    procs = data.num_proc or (len(os.sched_getaffinity(0)) if len(raw) > 10_000 else 1)
    with progress_bars(show=len(raw) > 10_000):  # a bar worth showing: tokenizing takes seconds or more
        encoded = raw.map(encoder, batched=True, with_indices=True, remove_columns=raw.column_names,
                          num_proc=procs if procs > 1 and len(raw) > 1000 else None,
                          desc=f"tokenizing {Path(spec.path).name}")
    errors = [(r, e) for r, e in zip(encoded["row"], encoded["error"]) if e]
    if errors and data.on_bad_row == "fail":
        shown = "; ".join(f"row {r}: {e}" for r, e in errors[:3])
        raise DataError(f"{spec.path}: {len(errors)} bad row(s) (rows counted from 0): {shown}. Fix them, or set "
                        "`data.on_bad_row: skip` to skip and count them.")
    if errors:
        stats.skipped += len(errors)
        stats.skipped_reasons += [f"{spec.path} row {r}: {e}" for r, e in errors[:5]]
        encoded = encoded.filter(lambda e: not e, input_columns="error")
    stats.truncated += sum(encoded["truncated"])
    return encoded.remove_columns(["error", "truncated", "row"])


def _weighted(ds: Dataset, weight: float, rng: random.Random) -> Dataset:
    """Each example `int(weight)` times, plus a random fraction for the remainder."""
    whole, frac = int(weight), weight - int(weight)
    indices = list(range(len(ds))) * whole + rng.sample(range(len(ds)), round(frac * len(ds)))
    return ds.select(indices) if indices != list(range(len(ds))) else ds


def encode_weighted(specs: list[DatasetSpec], tokenizer, data: DataSection, stats: DataStats, seed: int) -> Dataset:
    """The datasets of one recipe list (replay, KL or Fisher data) encoded and concatenated, each example
    `weight` times as in data.train."""
    rng = random.Random(seed)
    return concatenate_datasets([_weighted(encode_dataset(spec, tokenizer, data, stats), spec.weight, rng)
                                 for spec in specs])


def build_datasets(data: DataSection, tokenizer, seed: int) -> tuple[Dataset, Dataset | None, DataStats]:
    """Encoded training and validation examples, mixed by weight, bad rows handled as the recipe says."""
    rng = random.Random(seed)
    stats = DataStats()
    train_parts, val_parts = [], []
    for spec in data.train:
        encoded = encode_dataset(spec, tokenizer, data, stats)
        if data.val_fraction:
            # Split before weighting so no repeated example lands on both sides.
            split = encoded.train_test_split(test_size=data.val_fraction, seed=seed)
            encoded, held_out = split["train"], split["test"]
            val_parts.append(held_out)
        train_parts.append(_weighted(encoded, spec.weight, rng))
    for spec in data.validation:
        val_parts.append(encode_dataset(spec, tokenizer, data, DataStats()))
    train = concatenate_datasets(train_parts)
    if len(train) == 0:
        raise DataError("no usable training examples are left after skipping bad rows: " +
                        "; ".join(stats.skipped_reasons))
    count_tokens(train, stats)
    return train, (concatenate_datasets(val_parts) if val_parts else None), stats


def count_tokens(train: Dataset, stats: DataStats) -> None:
    stats.examples = len(train)
    stats.tokens = sum(len(t) for t in train["input_ids"])
    stats.target_tokens = sum(sum(t[1:]) for t in train["target"])


# ---------------------------------------------------------------- packing and batches


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices, each bin at most max_length tokens; examples are never split."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted, so bisect finds the tightest fit
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            rows.append([i])
            space, r = max_length - lengths[i], len(rows) - 1
        else:
            space, r = free.pop(pos)
            rows[r].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, r))
    # Rows in a stable order that does not depend on length, so shuffling is the sampler's job alone.
    return sorted(rows, key=min)


class RowDataset(torch.utils.data.Dataset):
    """Row i is the list of (input_ids, target) examples packed into it."""

    def __init__(self, examples: Dataset, max_length: int, packing: bool):
        self.examples = examples.with_format(None)
        lengths = [len(ids) for ids in examples["input_ids"]]
        self.rows = pack(lengths, max_length) if packing else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[tuple[list[int], list[int]]]:
        picked = self.examples[self.rows[i]]
        return list(zip(picked["input_ids"], picked["target"]))


@dataclass
class Collator:
    """Rows to tensors. `mask` says how examples sharing a row are kept apart:
    "segments": the rows' examples end to end in one row with no padding, plus `segment_lengths` for
    finetune's own sdpa (attention.py), which attends within each example;
    "block_bool" / "block_float": a 4D block-diagonal causal mask (sdpa / eager honour it);
    "position_ids": flash-attention kernels split sequences where position ids restart;
    "padding": one example per row, a plain 2D padding mask."""

    pad_id: int
    mask: str

    def __call__(self, rows: list[list[tuple[list[int], list[int]]]]) -> dict[str, torch.Tensor]:
        if self.mask == "segments":
            # Padding-free: which row an example was packed into no longer matters once attention is per example.
            out = self._collate([[example for row in rows for example in row]])
            out["segment_lengths"] = tuple(len(ids) for row in rows for ids, _ in row)
            # No padding, so a mask of ones is exact; without any mask transformers would rebuild a block mask from
            # the position ids on every forward (tiny model: 5 ms of a 40 ms step), which the segments make moot.
            out["attention_mask"] = torch.ones_like(out["input_ids"])
            return out
        return self._collate(rows)

    def _collate(self, rows: list[list[tuple[list[int], list[int]]]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(ids) for ids, _ in row) for row in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        segment = torch.full((batch, width), -1, dtype=torch.long)  # example number within the row; -1 = padding
        for b, row in enumerate(rows):
            start = 0
            for k, (ids, target) in enumerate(row):
                n = len(ids)
                ids_t = torch.tensor(ids)
                input_ids[b, start:start + n] = ids_t
                # Label at t is token t+1 of the same example, if that token is a target.
                shifted = torch.where(torch.tensor(target[1:], dtype=torch.bool), ids_t[1:], IGNORE)
                labels[b, start:start + n - 1] = shifted
                position_ids[b, start:start + n] = torch.arange(n)
                segment[b, start:start + n] = k
                start += n
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "n_tokens": (segment >= 0).sum()}
        if self.mask == "padding":
            out["attention_mask"] = (segment >= 0).long()
        elif self.mask in ("block_bool", "block_float"):
            out["attention_mask"] = block_causal_mask(segment, self.mask == "block_float")
        return out


def block_causal_mask(segment: torch.Tensor, additive: bool) -> torch.Tensor:
    """[batch, 1, T, T]: token i sees token j iff j <= i and both belong to the same example.
    Padding (-1) forms its own segment so no softmax row is empty."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # [batch, T, T]
    allowed = (same & causal)[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def mask_kind(attn_implementation: str, packing: bool, compiled: bool = False) -> str:
    """How the collator keeps packed examples apart for the model's actual attention implementation. Compiled
    models get the block mask: every new set of segment lengths would make torch.compile trace again."""
    if not packing:
        return "padding"
    if attn_implementation == attention.NAME:
        return "block_bool" if compiled else "segments"
    return {"sdpa": "block_bool", "eager": "block_float"}.get(attn_implementation, "position_ids")
