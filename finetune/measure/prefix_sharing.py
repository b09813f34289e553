"""Prompts encoded once where lm-eval encodes them again (`eval.share_prefixes`). A multiple-choice question's options
share its prompt, and lm-eval's HF model runs the prompt again for every option (its `_loglikelihood_tokens` encodes
context + continuation whole; its own "TODO: lump together requests with the same context"): here the contexts run
once, their key/value caches are repeated for the options, and only the options' own tokens run after them. The
prompts of a batch share their system turn (and fixed few-shot turns, in generation too): that prefix runs once for
the batch.

The numbers are lm-eval's up to float rounding: the same positions attend to the same keys, computed in another
grouping (a cache instead of one pass). bench/eval_speed.py counts the examples whose score differs from lm-eval's
own path on the demo's suites; the cache key of the base's scores names the path, so a base and a tuned model are
always scored the same way.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn.functional as F

from .batches import by_length

SCORING = "shared-prefix-5"  # in the base cache's key: scores from another path are not paired with these
TOKENS_PER_PASS = 8192  # prompt tokens (padding included) per forward pass: a batch, not one question at a time
MIN_PREFIX = 8  # shared tokens worth a forward pass of their own
PASS_TOKENS = 128  # padding tokens that cost less than one more forward pass (its fixed cost, on 2 CPU cores)


def loglikelihoods(lm, requests: list) -> list[tuple[float, bool]] | None:
    """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per lm-eval request
    ((key, context tokens, continuation tokens)), in their order; None where the model is not a plain causal LM
    whose whole input fits (lm-eval's own path handles those: seq2seq, truncation from the left)."""
    if lm.backend != "causal" or any(len(ctx) + len(cont) > lm.max_length + 1 for _, ctx, cont in requests):
        return None
    by_context: dict[tuple, list[int]] = defaultdict(list)
    for i, (_, ctx, _) in enumerate(requests):
        by_context[tuple(ctx)].append(i)
    groups = sorted(by_context.items(), key=lambda g: len(g[0]))  # similar lengths together: little padding
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    with torch.no_grad(), _autocast(lm):
        for part in by_length([len(ctx) for ctx, _ in groups], TOKENS_PER_PASS):
            batch = groups[part]
            answers = _score_groups(lm, [list(ctx) for ctx, _ in batch],
                                    [[requests[i][2] for i in members] for _, members in batch])
            for (_, members), group_answers in zip(batch, answers):
                for i, answer in zip(members, group_answers):
                    out[i] = answer
                    if requests[i][0] is not None:
                        lm.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    return out


def _cache_of(output) -> tuple[str, object]:
    """(the keyword a forward pass takes its key/value cache by, the cache `output` holds): transformers 5.25 renamed
    `past_key_values` to `cache` (the old name warns until 5.40)."""
    name = "cache" if hasattr(output, "cache") else "past_key_values"
    return name, getattr(output, name)


def _score_groups(lm, contexts: list[list[int]], conts: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
    """The answers of each context's continuations. The contexts' common prefix (the system turn of a chat template,
    fixed few-shot turns) runs once and its cache is repeated for them; the rest of each context runs as one batch,
    laid out prefix, padding, rest, whose last position predicts every option's first token. Then, pass by pass for
    options of similar lengths (_by_length), each context's cache is repeated once per option, and the options'
    further tokens run after it, right-padded, at the positions they hold after their own context."""
    device = lm.device
    pad = lm.tokenizer.pad_token_id or 0
    prefix = _common_prefix(contexts)
    rests = [c[prefix:] for c in contexts]
    width = max(len(r) for r in rests)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    positions = prefix + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones(len(rests), prefix, dtype=rest_mask.dtype, device=device), rest_mask], dim=1)
    shared = {}
    if prefix:
        head = lm.model(input_ids=torch.tensor([contexts[0][:prefix]], device=device), use_cache=True,
                        logits_to_keep=1)
        name, cache = _cache_of(head)
        cache.batch_repeat_interleave(len(rests))
        shared = {name: cache}
    first = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                     **shared)
    first_lp = F.log_softmax(first.logits[:, -1], dim=-1, dtype=lm.softmax_dtype)  # [contexts, vocab]
    owner = [g for g, options in enumerate(conts) for _ in options]  # the context of each option row
    options = [c for group in conts for c in group]
    lp_sum = first_lp[owner, [c[0] for c in options]].double()
    greedy = first_lp[owner].argmax(-1) == torch.tensor([c[0] for c in options], device=device)
    name, cache = _cache_of(first)
    for members in _by_length(options):
        rows_of = torch.tensor(members, device=device)
        of_context = torch.tensor([owner[k] for k in members], device=device)
        # Each option's tokens but its last, right-padded: the logits at step j predict its token j + 1.
        n = max(len(options[k]) for k in members) - 1
        rows = torch.tensor([options[k][:-1] + [pad] * (n + 1 - len(options[k])) for k in members], device=device)
        targets = torch.tensor([options[k][1:] + [-1] * (n + 1 - len(options[k])) for k in members], device=device)
        real = targets >= 0
        starts = torch.tensor([len(contexts[owner[k]]) for k in members], device=device)
        option_mask = torch.cat([mask[of_context], torch.ones_like(rows)], dim=1)  # padding after a row: unseen
        logits = lm.model(input_ids=rows, attention_mask=option_mask, position_ids=starts[:, None] + torch.arange(
            n, device=device)[None], use_cache=False, **{name: _selected(cache, of_context)}).logits
        lp = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)  # [options, n, vocab]
        picked = lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].double()
        lp_sum[rows_of] += (picked * real).sum(-1)
        greedy[rows_of] &= ((lp.argmax(-1) == targets) | ~real).all(-1)
    answers: list[list[tuple[float, bool]]] = [[] for _ in contexts]
    for g, total, is_greedy in zip(owner, lp_sum.tolist(), greedy.tolist()):
        answers[g].append((total, is_greedy))
    return answers


def _by_length(options: list[list[int]]) -> list[list[int]]:
    """The indices of the options of more than one token, in passes: options of one length together, and the
    next length's joined to them where the padding that adds costs less than a pass of its own. A multiple-choice
    option is mostly one or two tokens and a few run to eight: padded to the longest, 87% of the option tokens of the
    demo's general-knowledge suite were padding, and a pass costs ~100 tokens' time before its first token on 2 CPU
    cores (bench/eval_speed.py). One-token options need no pass at all."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for k, c in enumerate(options):
        if len(c) > 1:
            by_length[len(c)].append(k)
    passes: list[list[int]] = []
    width = 0
    for n, members in sorted(by_length.items()):
        if passes and len(passes[-1]) * (n - width) <= PASS_TOKENS:
            passes[-1] += members
        else:
            passes.append(list(members))
        width = n
    return passes


def _selected(cache, rows: torch.Tensor):
    """A new cache holding `rows` of `cache` (a row repeated where an index repeats), leaving `cache` as it is for
    the next options: a forward pass appends its keys and values to the cache it is given. The layers are copied
    shallowly; batch_select_indices then gives each copy tensors of its own."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


def _common_prefix(rows: list[list[int]]) -> int:
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
    turns, the system prompt) encoded once: each left-padded row becomes prefix, padding, the rest of its prompt, so
    the prefix sits in the same place in every row, its key/value cache is computed once and repeated for the rows,
    and only the rest runs per row. The same width as lm-eval's batch, so its own slicing of the replies holds."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(context, attention_mask)]
    prefix = _common_prefix(rows)
    if not prefix:
        return generate(context=context, attention_mask=attention_mask, **kwargs)
    width, pad = context.shape[1], lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([r[:prefix] + [pad] * (width - len(r)) + r[prefix:] for r in rows], device=context.device)
    mask = torch.tensor([[1] * prefix + [0] * (width - len(r)) + [1] * (len(r) - prefix) for r in rows],
                        device=context.device)
    with torch.no_grad(), _autocast(lm):  # as lm-eval's generate runs the rest
        first = lm.model(input_ids=ids[:1, :prefix], use_cache=True, logits_to_keep=1)
    name, cache = _cache_of(first)
    cache.batch_repeat_interleave(len(rows))
    return generate(context=ids, attention_mask=mask, **{name: cache}, **kwargs)
