"""The three row formats (text, instruction, chat): what makes a row usable, and how it becomes tokens and targets.

No torch and no datasets here: `finetune check` and the checks before `finetune train` loads anything encode a
dataset's first rows with these functions and the tokenizer alone, in a second rather than a model load's imports.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError

_ROLES = {"system", "user", "assistant", "tool"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"



class DataError(UserError):
    """A dataset that cannot be used as the recipe says; the message names the file, row and fix."""




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
