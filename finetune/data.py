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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets, load_dataset

from . import attention, quiet
from .formats import FORMATS, DataError, make_encoder
from .quiet import progress_bars
from .recipe import LOCAL_BUILDERS, DataSection, DatasetSpec

quiet.datasets_library()

IGNORE = -100


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
