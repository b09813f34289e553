"""Drift from the base model: how far the tuned model's next-token distributions moved, on text the base writes.

Task scores say what was forgotten on the tasks someone thought to test; drift sees every token. The default
texts are continuations the base model samples for general prompts, so the mean per-token KL(P_base || P_tuned)
on them estimates the KL between the two models' distributions over text, where the base puts its mass.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError
from .records import Drift

# General prompts the base model continues to make the default drift texts: a spread of registers and topics,
# none tied to a fine-tuning task.
DEFAULT_PROMPTS = [
    "The history of the city begins",
    "To make a good cup of tea, you",
    "In mathematics, a prime number is",
    "The main causes of the First World War were",
    "Dear friend, I am writing to tell you",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The weather today is",
    "Once upon a time, in a small village,",
    "The most important thing to remember when learning a language is",
    "Q: What is the capital of Japan?\nA:",
    "Water boils at",
    "The stock market fell sharply on Monday after",
    "Here is a simple recipe for bread:",
    "The human heart has four chambers:",
    "In the year 2050, cities will",
    "The rules of chess are simple:",
    "She opened the door and saw",
    "A good night's sleep helps",
    "The theory of evolution explains",
]
NEW_TOKENS = 64  # sampled per prompt: long enough to leave the prompt's topic, short enough to stay coherent
SAMPLING_SEED = 0


class DriftError(UserError):
    """Drift texts that cannot be used; the message names the file and what it needs."""


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off for the duration (identical weights must give identical logits), then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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


@torch.no_grad()
def _next_token_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """[T-1, vocab] float64 log-probabilities of the token after each prefix of `ids` ([T]), last prefix excluded."""
    logits = model(input_ids=ids[None]).logits[0, :-1]  # [T-1, vocab]
    return torch.log_softmax(logits.double(), dim=-1)


def kl_drift(base_model, tuned_model, tokenizer, texts: list[str], *, max_length: int) -> Drift:
    """Mean per-token KL(P_base || P_tuned) over every predicted token of `texts`, and both perplexities.

    One text per forward pass, no padding: identical weights see identical inputs and give bit-identical logits,
    so the KL is exactly 0.0 for a model compared with itself. Everything after the logits is float64."""
    kl_sum = nll_base = nll_tuned = 0.0
    tokens = 0
    with eval_mode(base_model), eval_mode(tuned_model):
        for text in texts:
            ids = torch.tensor(tokenizer(text, truncation=True, max_length=max_length)["input_ids"],
                               device=_device(tuned_model))
            if len(ids) < 2:
                continue  # nothing to predict
            base_lp = _next_token_log_probs(base_model, ids)
            tuned_lp = _next_token_log_probs(tuned_model, ids)
            # kl_div(input, target) = sum target_p * (log target_p - input): KL(base || tuned) per position.
            kl_sum += torch.nn.functional.kl_div(tuned_lp, base_lp, log_target=True, reduction="sum").item()
            targets = ids[1:, None]  # [T-1, 1]
            nll_base -= base_lp.gather(1, targets).sum().item()
            nll_tuned -= tuned_lp.gather(1, targets).sum().item()
            tokens += len(ids) - 1
    if tokens == 0:
        raise DriftError("the drift texts hold no text of two tokens or more; give longer texts (eval.drift_texts).")
    ppl_base, ppl_tuned = math.exp(nll_base / tokens), math.exp(nll_tuned / tokens)
    return Drift(kl=kl_sum / tokens, ppl_base=ppl_base, ppl_tuned=ppl_tuned, ppl_ratio=ppl_tuned / ppl_base,
                 tokens=tokens)


@torch.no_grad()
def sample_texts(base_model, tokenizer, prompts: list[str], *, new_tokens: int, seed: int) -> list[str]:
    """Prompt + a sampled continuation (temperature 1, no top-k/top-p: the base model's own distribution) each.

    The global RNG is forked, so drawing these texts does not move the training run's random stream."""
    texts = []
    device = _device(base_model)
    with eval_mode(base_model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            out = base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                      use_cache=True, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


def read_texts(paths: list[str]) -> list[str]:
    """Texts from .txt files (one per non-empty line) and .jsonl files (the `text` field of each row)."""
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
