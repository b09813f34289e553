"""Prompts encoded once where lm-eval encodes them again (`eval.share_prefixes`). A multiple-choice question's options
share its prompt, and lm-eval's HF model runs the prompt again for every option (its `_loglikelihood_tokens` encodes
context + continuation whole; its own "TODO: lump together requests with the same context"): here each context
runs once, with its options' tokens beside it in the same row under a tree-shaped attention mask, and the output
layer computes only the positions that predict an option's token. The prompts of a batch share their system turn
(and fixed few-shot turns, in generation too): that prefix runs once for the batch.

The numbers are lm-eval's up to float rounding: the same positions attend to the same keys, computed in another
grouping (one row per question instead of one per option; a cache for the prefix). bench/eval_speed.py counts
the examples whose score differs from lm-eval's own path on the demo's suites; the cache key of the base's scores
names the path, so a base and a tuned model are always scored the same way.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..model import head_at
from .batches import by_length

SCORING = "shared-prefix-6"  # in the base cache's key: scores from another path are not paired with these
TOKENS_PER_PASS = 8192  # row tokens (padding included) per forward pass: a batch, not one question at a time
MIN_PREFIX = 8  # shared tokens worth a forward pass of their own


def loglikelihoods(lm, requests: list) -> list[tuple[float, bool]] | None:
    """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per lm-eval request
    ((key, context tokens, continuation tokens)), in their order; None where the model is not a plain causal LM
    whose whole input fits (lm-eval's own path handles those: seq2seq, truncation from the left)."""
    if lm.backend != "causal" or any(len(ctx) + len(cont) > lm.max_length + 1 for _, ctx, cont in requests):
        return None
    by_context: dict[tuple, list[int]] = defaultdict(list)
    for i, (_, ctx, _) in enumerate(requests):
        by_context[tuple(ctx)].append(i)
    def row_length(group) -> int:  # the context and its options' tokens but their last (_score_groups)
        return len(group[0]) + sum(len(requests[i][2]) - 1 for i in group[1])

    groups = sorted(by_context.items(), key=row_length)  # similar lengths together: little padding
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    with torch.no_grad(), _autocast(lm):
        for part in by_length([row_length(g) for g in groups], TOKENS_PER_PASS):
            batch = groups[part]
            answers = _score_groups(lm, [list(ctx) for ctx, _ in batch],
                                    [[requests[i][2] for i in members] for _, members in batch])
            for (_, members), group_answers in zip(batch, answers):
                for i, answer in zip(members, group_answers):
                    out[i] = answer
                    if requests[i][0] is not None:
                        lm.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    return out


# Within kept_prefixes(): (id of the model, precision, prefix) -> (the model, held so that its id is not reused by
# another while the scope lasts; the keyword; one row's cache)
_kept: dict | None = None


@contextmanager
def kept_prefixes() -> Iterator[None]:
    """Within it, the key/value cache of a prefix is computed once per model and precision and copied for every
    later batch that begins with it: the few-shot turns of every generation batch, the system turn of every
    multiple-choice and drift batch. In the demo's tuned evaluation 32 such passes ran 1,844 prefix tokens, one row
    at a time, of 150 distinct ones (3.7 s of ~60). For one evaluation of fixed weights: a model whose weights or
    adapter change inside it would be given the cache of what it was."""
    global _kept
    outer = _kept
    _kept = {} if outer is None else outer
    try:
        yield
    finally:
        _kept = outer


def repeated_prefix_cache(model, prefix: torch.Tensor, rows: int) -> dict:
    """{the keyword a forward pass takes its key/value cache by: the cache of `prefix` ([1, tokens]), run once (its
    last position's logits only) and repeated for `rows` rows}; within kept_prefixes(), a copy of the cache the
    same model made of the same prefix earlier."""
    if _kept is None:
        name, cache = _prefix_cache(model, prefix)
    else:
        device = prefix.device.type
        key = (id(model), torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device), *prefix[0].tolist())
        if key not in _kept:
            _kept[key] = (model, *_prefix_cache(model, prefix))
        _, name, kept = _kept[key]
        cache = copy.deepcopy(kept)  # batch_repeat_interleave repeats in place; the kept one stays one row
    cache.batch_repeat_interleave(rows)
    return {name: cache}


def _prefix_cache(model, prefix: torch.Tensor) -> tuple[str, object]:
    """(the keyword, the key/value cache) of one pass over `prefix`: transformers 5.25 renamed `past_key_values` to
    `cache` (the old name warns until 5.40)."""
    output = model(input_ids=prefix, use_cache=True, logits_to_keep=1)
    name = "cache" if hasattr(output, "cache") else "past_key_values"
    return name, getattr(output, name)


def _score_groups(lm, contexts: list[list[int]], conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
    """The answers of each context's continuations, in one forward pass. The contexts' common prefix (the system
    turn of a chat template, fixed few-shot turns) runs once and its cache is repeated for them. Each row then holds
    the rest of its context followed by each option's tokens but the last, side by side: an option's tokens see the
    prefix, the whole context and their own earlier tokens, never another option's, and sit at the positions they
    would hold right after the context (a tree of continuations, as in speculative decoding's tree attention). The
    context's last position predicts every option's first token; the output layer computes only the positions that
    predict an option's token."""
    device = lm.device
    pad = lm.tokenizer.pad_token_id or 0
    prefix = common_prefix(contexts)
    rows, positions, spans = [], [], []  # per context: its tokens, their positions, (start, length) of each option
    for ctx, options in zip(contexts, conts):
        tokens, at, own = list(ctx[prefix:]), list(range(prefix, len(ctx))), []
        for option in options:
            own.append((len(tokens), len(option) - 1))
            tokens += option[:-1]
            at += range(len(ctx), len(ctx) + len(option) - 1)
        rows.append(tokens)
        positions.append(at)
        spans.append(own)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    position_ids = torch.tensor([p + [0] * (width - len(p)) for p in positions], device=device)
    # Which keys each query sees: the prefix, and within its row a causal context and the option branches. Every
    # position sees itself, so a padding position's attention has something to weigh (no NaN to leak into others).
    # And the logits wanted, in order: each context's last position, then its options' positions.
    sees = torch.zeros(len(rows), width, prefix + width, dtype=torch.bool)
    sees[:, :, :prefix] = True
    sees[:, torch.arange(width), prefix + torch.arange(width)] = True
    wanted, first_of = [], []
    for r, (ctx, own) in enumerate(zip(contexts, spans)):
        n = len(ctx) - prefix
        sees[r, :n, prefix:prefix + n] = torch.ones(n, n, dtype=torch.bool).tril()
        first_of.append(len(wanted))
        wanted.append(r * width + n - 1)
        for start, length in own:
            sees[r, start:start + length, prefix:prefix + n] = True
            sees[r, start:start + length, prefix + start:prefix + start + length] = \
                torch.ones(length, length, dtype=torch.bool).tril()
            wanted += range(r * width + start, r * width + start + length)
    shared = repeated_prefix_cache(lm.model, torch.tensor([contexts[0][:prefix]], device=device), len(rows)) \
        if prefix else {}
    with head_at(lm.model, torch.tensor(wanted, device=device)):
        logits = lm.model(input_ids=ids, attention_mask=sees[:, None].to(device), position_ids=position_ids,
                          use_cache=False, **shared).logits[0]
    lp = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)  # [wanted positions, vocab]
    top = lp.amax(-1)  # a third of argmax's time on the CPU; argmax's choice among ties is checked where it matters
    answers: list[list[tuple[float, bool]]] = []
    for r, (ctx, options, own) in enumerate(zip(contexts, conts, spans)):
        rest = len(ctx) - prefix
        row_answers = []
        for option, (start, _) in zip(options, own):
            # The option's first token is predicted at the context's end, its token j at its own token j - 1.
            at = [first_of[r]] + [first_of[r] + 1 + start - rest + j for j in range(len(option) - 1)]
            picked = lp[at, option]
            row_answers.append((float(picked.double().sum()), is_greedy(lp, top, at, option)))
        answers.append(row_answers)
    return answers


def is_greedy(lp: torch.Tensor, top: torch.Tensor, at: list[int], tokens: list[int]) -> bool:
    """Whether `tokens` are each row's argmax among `lp`'s rows `at` (lm-eval's greedy flag), from the rows' maxima
    `top`: each token's value is its row's top one and no earlier token of the row ties with it (argmax takes the
    first)."""
    return bool((lp[at, tokens] == top[at]).all()) and not any(bool((lp[k, :t] == top[k]).any())
                                                               for k, t in zip(at, tokens))


def common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving at least one token of each row to run after them; 0 where
    fewer than MIN_PREFIX are shared (not worth a pass of their own) or there is only one row."""
    shortest = min(len(r) for r in rows)
    prefix = 0
    while prefix < shortest - 1 and all(r[prefix] == rows[0][prefix] for r in rows):
        prefix += 1
    return prefix if prefix >= MIN_PREFIX and len(rows) > 1 else 0


def _autocast(lm) -> torch.autocast:
    """lm-eval's own autocast around a forward pass (HFLM._model_call and _model_generate)."""
    return torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                          enabled=lm.mixed_precision_dtype is not None)


def generate_with_shared_prefix(lm, generate, context: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """lm-eval's batched generation (`generate`: HFLM._model_generate) with the rows' common prefix (the few-shot
    turns, the system prompt) encoded once (with_shared_lead). The same width as lm-eval's batch, so its own slicing
    of the replies holds."""
    with torch.no_grad(), _autocast(lm):  # as lm-eval's generate runs the rest
        shared = with_shared_lead(lm.model, context, attention_mask, lm.tokenizer.pad_token_id or 0)
    if shared is None:
        return generate(context=context, attention_mask=attention_mask, **kwargs)
    return generate(context=shared.pop("input_ids"), **shared, **kwargs)


def with_shared_lead(model, ids: torch.Tensor, mask: torch.Tensor, pad: int) -> dict | None:
    """generate()'s inputs for a left-padded batch whose rows share a lead (common_prefix): each row becomes lead,
    padding, the rest of its prompt, so that the lead sits in the same place in every row; its key/value cache is
    computed once and repeated for the rows, and only the rest runs per row. None where nothing is shared."""
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    lead = common_prefix(rows)
    if not lead:
        return None
    width = ids.shape[1]
    ids = torch.tensor([r[:lead] + [pad] * (width - len(r)) + r[lead:] for r in rows], device=ids.device)
    mask = torch.tensor([[1] * lead + [0] * (width - len(r)) + [1] * (len(r) - lead) for r in rows], device=ids.device)
    return {"input_ids": ids, "attention_mask": mask, **repeated_prefix_cache(model, ids[:1, :lead], len(rows))}
