"""Drift from the base model: how far the tuned model's next-token distributions moved, on text the base writes.

Task scores say what was forgotten on the tasks someone thought to test; drift sees every token. Two kinds of text,
each written once by the base model itself (sampled at temperature 1, seeded, cached) for shipped prompts
(drift_prompts.json, 100 of each, none tied to a fine-tuning task or an evaluation suite):

- "chat": the base's replies to general user requests, rendered in the model's chat template; the KL is taken on
  the reply's tokens (end of turn included), where a chat model is used. Only for tokenizers with a chat template.
- "text": continuations of general text openings; the KL is taken on every token. `eval.drift_texts` replaces them
  with the user's own texts.

The mean per-token KL(P_base || P_tuned) on the base's own text estimates the KL between the two models where the
base puts its mass. Its interval resamples whole texts (tokens of one text are not independent).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UserError
from ..model import eval_mode, head_at, output_layer
from ..reports.forgetting import bootstrap_ratio
from ..reports.records import Drift
from .batches import by_length
from .prefix_sharing import MIN_PREFIX, common_prefix, repeated_prefix_cache, with_shared_lead
from .sharing import Ranks

PROMPTS = json.loads(Path(__file__).with_name("drift_prompts.json").read_text(encoding="utf-8"))
NEW_TOKENS = 48  # sampled per prompt: long enough to leave the prompt's topic, short enough to stay coherent
SAMPLING_SEED = 0
# Prompts sampled together (left-padded). The texts depend on it (one seeded stream, drawn batch by batch), so it
# is in the cache key. 100, the demo's prompts of each kind in one batch: on 2 CPU cores a decoding step of 50 rows
# took 1.8x one of 20, so 50 texts were drawn 1.7x faster in one batch than in three (bench/eval_speed.py).
GENERATION_BATCH = 100
# How a next token is drawn (_Draw), in the texts' cache key: the texts changed when it did.
DRAW = "race, -log U"
TOKENS_PER_PASS = 1024  # drift tokens (padding included) per forward pass; both models' logits are held at once
LAYOUT = "shared-prefix"  # how a batch runs (_layout), in the key of the base's cached head inputs


class DriftError(UserError):
    """Drift texts that cannot be used; the message names the file and what it needs."""


class AdapterDisabled(torch.nn.Module):
    """The base model inside a peft model: the same weights with the adapter switched off, without a second copy."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def kl_drift(base_model, tuned_model, tokenizer, texts: list, *, max_length: int, special_tokens: bool = True,
             ranks: Ranks = Ranks(), autocast: torch.dtype | None = None, base_inputs: list | None = None,
             base_head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Drift:
    """Mean per-token KL(P_base || P_tuned) over the measured tokens of `texts`, both perplexities, and a bootstrap
    interval over texts. Each text is a string, measured whole (every token but the first, which nothing predicts),
    or [text, start]: only tokens that begin at or after character `start` are measured. With several `ranks`, each
    measures its share of the batches; the sums run over all texts in their order, as in one process.

    Texts of similar length run in right-padded batches (bench/eval_speed.py measures the gain over one text per
    pass), the same batches through both models: identical weights see identical inputs and give bit-identical
    logits, so the KL is exactly 0.0 for a model compared with itself. The batches are made from all the texts
    before the ranks share them out, so every text is measured in the same batch, to the bit, whatever the number of
    ranks. Both models' forward passes run under `autocast` (a dtype) when it is set; their distributions are float32
    (_compare).

    With `base_inputs` (head_inputs() of the base on these texts, cached with them) and `base_head` (the base's
    output layer, or a function applying it), the base does not run again: its logits are its head applied to what
    its head saw, in the same batches, so the result is the same to the bit as running it. Either way the heads
    compute the measured positions' logits only."""
    encoded = [_encode(tokenizer, item, max_length=max_length, special_tokens=special_tokens) for item in texts]
    batches = _batches(encoded)
    with eval_mode(tuned_model), eval_mode(base_model) if base_model is not None else nullcontext():
        per_batch = ranks.map(batches, lambda share: [
            _measure_batch(base_model, tuned_model, [encoded[i] for i in b], autocast,
                           None if base_inputs is None else ([base_inputs[i] for i in b], base_head))
            for b in share], what="drift batches")
    by_text = {i: m for batch, results in zip(batches, per_batch) for i, m in zip(batch, results)}
    measured = [by_text[i] for i in sorted(by_text)]  # texts with nothing to predict are in no batch
    kl_per_text = [kl for kl, _, _, _ in measured]
    tokens_per_text = [n for _, n, _, _ in measured]
    tokens = sum(tokens_per_text)
    if tokens == 0:
        raise DriftError("the drift texts hold no text of two tokens or more; give longer texts (eval.drift_texts).")
    nll_base, nll_tuned = -sum(lp for _, _, lp, _ in measured), -sum(lp for _, _, _, lp in measured)
    ppl_base, ppl_tuned = math.exp(nll_base / tokens), math.exp(nll_tuned / tokens)
    return Drift(kl=sum(kl_per_text) / tokens, ci95=bootstrap_ratio(kl_per_text, tokens_per_text),
                 ppl_base=ppl_base, ppl_tuned=ppl_tuned, ppl_ratio=ppl_tuned / ppl_base, tokens=tokens,
                 texts=len(kl_per_text))


def head_inputs(base_model, tokenizer, texts: list, *, max_length: int, special_tokens: bool = True,
                ranks: Ranks = Ranks(), autocast: torch.dtype | None = None) -> list | None:
    """What the base's output layer sees at each text's measured positions ([positions, hidden], on the CPU; None
    for a text with none), computed in kl_drift's batches, so that later measurements need not run the base again;
    None for a model whose logits are more than its output layer's output (a final soft-cap or scale), which
    kl_drift then runs whole. A few MB per hundred texts for a model of hidden size 576."""
    encoded = [_encode(tokenizer, item, max_length=max_length, special_tokens=special_tokens) for item in texts]
    batches = _batches(encoded)
    with eval_mode(base_model):
        if not batches or not _logits_are_head_output(base_model, encoded[batches[0][0]]):
            return None
        per_batch = ranks.map(batches, lambda share: [
            _head_inputs_of_batch(base_model, [encoded[i] for i in b], autocast) for b in share], what="drift batches")
    out: list = [None] * len(texts)
    for batch, rows in zip(batches, per_batch):
        for i, r in zip(batch, rows):
            out[i] = r
    return out


class _Layout(NamedTuple):
    """A batch of drift texts as the models run it: the texts' common prefix (a chat template's system turn) once,
    then each text's rest, right-padded."""
    prefix: torch.Tensor | None  # [1, shared tokens], or None: nothing shared
    ids: torch.Tensor  # [texts, width]: each text after the prefix
    mask: torch.Tensor  # [texts, prefix + width]
    positions: torch.Tensor  # flat indices into ids' texts x width whose logits predict measured tokens
    targets: torch.Tensor  # those tokens


def _layout(batch: list[tuple[list[int], list[int]]], device: torch.device) -> _Layout:
    """The batch's layout. The prefix shared is at most what comes before every text's first position whose logits
    are measured (a chat text's reply): it runs once, its key/value cache repeated for the texts; 2,400 of the demo's
    8,550 chat drift tokens. Raw texts are measured from their second token and share none."""
    rows = [ids for ids, _ in batch]
    shared = min(common_prefix(rows), min(measured[0] for _, measured in batch) - 1)
    shared = shared if shared >= MIN_PREFIX else 0
    width = max(len(ids) for ids in rows) - shared
    ids = torch.tensor([r[shared:] + [0] * (width - len(r) + shared) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r) + shared) for r in rows], device=device)
    positions = torch.tensor([row * width + t - 1 - shared for row, (_, measured) in enumerate(batch)
                              for t in measured], device=device)
    prefix = torch.tensor([rows[0][:shared]], device=device) if shared else None
    return _Layout(prefix, ids, mask, positions, ids.reshape(-1)[positions + 1])


def _run(model, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits at the layout's measured positions, [positions, vocab]; what the output layer was given there)."""
    # Outside head_at: the prefix's own pass asks for its last position's logits.
    shared = repeated_prefix_cache(model, layout.prefix, len(layout.ids)) if layout.prefix is not None else {}
    with head_at(model, layout.positions) as seen:
        logits = model(input_ids=layout.ids, attention_mask=layout.mask, use_cache=False, **shared).logits[0]
    return logits, seen[0][0]


@torch.no_grad()
def _logits_are_head_output(model, text: tuple[list[int], list[int]]) -> bool:
    """Whether the model's logits are its output layer's output and nothing more, checked on one text in the
    model's own dtype: the model's logits and its output layer applied to what that layer was given differ by float
    rounding (the matmuls' shapes differ), or by far more where a final soft-cap or scale follows the layer."""
    layout = _layout([text], _device(model))
    whole = model(input_ids=layout.ids, attention_mask=layout.mask).logits
    measured = output_layer(model)(_run(model, layout)[1][None])[0]
    whole = whole.reshape(-1, whole.shape[-1])[layout.positions]
    if whole.shape != measured.shape:
        return False
    tolerance = max(4 * torch.finfo(whole.dtype).eps, 1e-5) * float(whole.abs().max())
    return float((whole.float() - measured.float()).abs().max()) <= tolerance


@torch.no_grad()
def _head_inputs_of_batch(model, batch: list[tuple[list[int], list[int]]], autocast: torch.dtype | None) -> list:
    layout = _layout(batch, _device(model))
    with torch.autocast(layout.ids.device.type, dtype=autocast, enabled=autocast is not None):
        seen = _run(model, layout)[1]
    return [rows.cpu() for rows in seen.split([len(measured) for _, measured in batch])]


def _batches(encoded: list) -> list[list[int]]:
    """The indices of the texts to measure, by length, in batches of up to TOKENS_PER_PASS tokens (padding
    included)."""
    order = sorted((i for i, e in enumerate(encoded) if e is not None), key=lambda i: len(encoded[i][0]))
    return [order[part] for part in by_length([len(encoded[i][0]) for i in order], TOKENS_PER_PASS)]


@torch.no_grad()
def _measure_batch(base_model, tuned_model, batch: list[tuple[list[int], list[int]]],
                   autocast: torch.dtype | None = None, cached: tuple[list, Callable] | None = None) \
        -> list[tuple[float, int, float, float]]:
    """(KL summed over the text's measured tokens, their number, their log-likelihood under the base, under the
    tuned model) for each encoded text of one batch; `cached`: (the base's head inputs for these texts, its output
    layer) in place of running the base."""
    layout = _layout(batch, _device(tuned_model))
    device = layout.ids.device
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        tuned_logits = _run(tuned_model, layout)[0]
        if cached is None:
            base_logits = _run(base_model, layout)[0]
        else:
            inputs, head = cached
            base_logits = head(torch.cat(inputs).to(device, non_blocking=True)[None])[0]
    counts = [len(measured) for _, measured in batch]
    return [_compare(b, t, y) for b, t, y in zip(base_logits.split(counts), tuned_logits.split(counts),
                                                 layout.targets.split(counts))]


def _encode(tokenizer, item, *, max_length: int, special_tokens: bool) -> tuple[list[int], list[int]] | None:
    """(token ids, the positions whose token is measured) of one drift text; None when it has none."""
    text, start = (item, 0) if isinstance(item, str) else item
    enc = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=special_tokens,
                    return_offsets_mapping=True)
    measured = [t for t, (begin, _) in enumerate(enc["offset_mapping"]) if t > 0 and begin >= start]
    return (enc["input_ids"], measured) if measured else None


def _compare(base_logits: torch.Tensor, tuned_logits: torch.Tensor, targets: torch.Tensor) \
        -> tuple[float, int, float, float]:
    """One text's sums over its measured tokens, from the two models' logits where they predict them. The
    distributions are float32 (the logits are bf16 or float32 themselves; in float64 this took 1.3-2.0 s of each
    kind's ~10 s on the demo), each position's sum over the vocabulary float32, the sums over positions float64."""
    base_lp = torch.log_softmax(base_logits.float(), dim=-1)
    tuned_lp = torch.log_softmax(tuned_logits.float(), dim=-1)
    # kl_div(input, target) = target_p * (log target_p - input): KL(base || tuned) at each position.
    kl = torch.nn.functional.kl_div(tuned_lp, base_lp, log_target=True, reduction="none").sum(-1)
    return kl.double().sum().item(), len(targets), base_lp.gather(1, targets[:, None]).double().sum().item(), \
        tuned_lp.gather(1, targets[:, None]).double().sum().item()


class _Draw:
    """A logits processor that draws each row's next token from softmax(scores) and leaves only that token, so that
    generate()'s greedy choice takes it. The draw is torch.multinomial's own: the token with the largest p / E, an
    exponential variate E per vocabulary entry, a race whose winner a little rounding seldom changes (of 40 chat
    texts of 16 tokens drawn in bf16 with the system turn's cache shared and without, 34 came out the same; by one
    uniform against the cumulative sum, 4). Only the variates are drawn another way, as -log U from `generator`:
    multinomial's exponential_ took 47 ms of a 150 ms decoding step of 50 rows over SmolLM2's 49,152 tokens on 2 CPU
    cores, this 16."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        variates = torch.rand(probs.shape, generator=self.generator, device=probs.device).log_().neg_()
        token = (probs / variates).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


@torch.no_grad()
def _sample(base_model, tokenizer, prompts: list[str], *, new_tokens: int, seed: int, special_tokens: bool,
            autocast: torch.dtype | None = None) -> list[tuple[str, str]]:
    """(prompt, sampled continuation) for each prompt: temperature 1, no top-k/top-p, the base model's own
    distribution (_Draw), under `autocast` (the evaluation's precision) when it is set. The draws come from their
    own generator seeded with `seed`, so drawing these texts does not move the training run's random stream."""
    from transformers import GenerationConfig, LogitsProcessorList

    out = []
    device = _device(base_model)
    draw = _Draw(torch.Generator(device=device).manual_seed(seed))
    # A config of its own: the model's (sampling settings of its authors) would be merged in and warned about.
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=base_model.generation_config.eos_token_id)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues each row from its last real token
    try:
        with eval_mode(base_model), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            for i in range(0, len(prompts), GENERATION_BATCH):
                batch = prompts[i:i + GENERATION_BATCH]
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=special_tokens).to(device)
                # A chat template's system turn, shared by every prompt, runs once.
                inputs = with_shared_lead(base_model, enc["input_ids"], enc["attention_mask"],
                                          tokenizer.pad_token_id or 0) or dict(enc)
                generated = base_model.generate(**inputs, generation_config=config,
                                                logits_processor=LogitsProcessorList([draw]))
                width = enc["input_ids"].shape[1]
                out += [(p, tokenizer.decode(g[width:], skip_special_tokens=True)) for p, g in zip(batch, generated)]
    finally:
        tokenizer.padding_side = side
    return out


def sample_texts(base_model, tokenizer, prompts: list[str], *, new_tokens: int, seed: int,
                 autocast: torch.dtype | None = None) -> list[str]:
    """Raw-text drift texts: each prompt and the base's continuation, measured whole."""
    return [prompt + reply for prompt, reply in _sample(base_model, tokenizer, prompts, new_tokens=new_tokens,
                                                        seed=seed, special_tokens=True, autocast=autocast)]


def sample_chat(base_model, tokenizer, prompts: list[str], *, new_tokens: int, seed: int,
                autocast: torch.dtype | None = None) -> list[list]:
    """Chat drift texts: each request and the base's reply, rendered with the chat template; measured on the reply
    (and the end of turn the template adds after it)."""
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    replies = _sample(base_model, tokenizer, rendered, new_tokens=new_tokens, seed=seed, special_tokens=False,
                      autocast=autocast)
    texts = []
    for prompt, prefix, (_, reply) in zip(prompts, rendered, replies):
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": reply.strip()}], tokenize=False)
        # A template that renders the conversation so that it begins with the prompt's render lets the reply be
        # located; otherwise the whole conversation is measured.
        texts.append([full, len(prefix) if full.startswith(prefix) else 0])
    return texts


def read_texts(paths: list[str]) -> list[str]:
    """Texts from .txt files (one per non-empty line) and .jsonl files (the `text` field of each row), measured
    whole."""
    texts = []
    for path in paths:
        if not Path(path).is_file():
            raise DriftError(f"drift text file {path} does not exist (paths are relative to the folder you run "
                             f"from, {Path.cwd()}).")
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.endswith(".jsonl"):
            for i, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DriftError(f"{path} line {i} is not JSON ({e.msg}).") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DriftError(f"{path} line {i}: drift texts need a string `text` field.")
                texts.append(row["text"])
        elif path.endswith(".txt"):
            texts.extend(lines)
        else:
            raise DriftError(f"drift text file {path}: use .txt (one text per line) or .jsonl (a `text` field).")
    return texts
