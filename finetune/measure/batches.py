"""Forward passes of many sequences at once, with little padding: sequences sorted by length, cut into batches."""

from __future__ import annotations


def by_length(lengths: list[int], tokens_per_pass: int) -> list[slice]:
    """Consecutive slices of `lengths` (sorted shortest first) whose rows, each padded to the slice's last and
    longest, hold at most `tokens_per_pass` tokens; a row longer than that is a batch of its own."""
    batches, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and (end + 1 - start) * lengths[end] <= tokens_per_pass:
            end += 1
        batches.append(slice(start, end))
        start = end
    return batches
