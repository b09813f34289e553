"""Stay close to the base model's predictions: `weight * KL(base || tuned)` on the next-token distributions of a
stream of general prompts, `rows_per_step` rows of them per update, beside the task loss (Learning without
Forgetting, Li & Hoiem 2016, in its distillation form).

Where KL is taken: at the target positions of those rows, the assistant turns of chat rows (every token of text rows,
or with `data.train_on: all`), i.e. the distributions a reply is generated from. That is where the demo forgets (every
short prompt answered with a bin name) and where its drift is measured; prompt tokens are text the model is given,
never generates, and pinning them would spend the penalty on predicting users.

Where the base's predictions come from: with LoRA, the same model with its adapter off (peft's `disable_adapter`):
no second copy of any weight. Full fine-tuning has two choices:
  - a frozen copy of the base: one more copy of the weights (in model.dtype; beside the weights, gradients and AdamW's
    two moments, a fifth more training state), one no-grad forward of the update's rows per step, nothing on disk;
    any prompt stream, exact over the whole vocabulary.
  - base log-probabilities precomputed once for a fixed prompt set: no copy and no base forward per step, but a pass
    before training, a cache on disk to key and invalidate, and [positions x vocab] floats: data/general/
    self_replay.jsonl has 8,111 target tokens at the demo's max_length 128, x 49,152 x 4 bytes = 1.6 GB, so a top-k
    truncation in practice (k = 64: 4 MB with int32 indices), which makes the KL approximate and its gradient
    wrong on the tail; and a fixed prompt set, where a stream can draw from data of any size.
  The copy is taken: exact, little code, and its memory is of the order of what L2-SP keeps for full fine-tuning.

Exact across accumulation and ranks: `apply()` runs after the data gradient is all-reduced, so each rank takes its
share of the update's rows, the gradients of the ranks' KL sums are summed here (one all-reduce per 64 MB), and the
sum is divided by the global count of KL positions: the same penalty and gradient on every rank, for any split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from ..data import IGNORE, Collator, DataStats, encode_weighted, mask_kind
from ..errors import UserError
from ..loss import logits_at
from ..model import eval_mode, load_model

BUCKET = 2**24  # gradient elements per all-reduce: 64 MB of float32
STATE_FILE = "kl_to_base.json"  # in each checkpoint: the prompt stream's position


class KLToBaseError(UserError):
    """A `train.kl_to_base` setting this run cannot honour."""


def label(recipe) -> str | None:
    section = recipe.train.kl_to_base
    if section is None:
        return None
    return f"KL to base {section.weight:g}" + (f" (first {section.first_tokens} tokens)" if section.first_tokens else "")


def regularizer(recipe, ctx) -> KLToBase | None:
    section = recipe.train.kl_to_base
    if section is None:
        return None
    if ctx.engine.sharded:
        # The base forward and the KL backward run on the model outside the engine's wrapper, which needs every
        # process to hold whole weights; under FSDP/DeepSpeed each holds a shard.
        raise KLToBaseError(f"`train.kl_to_base` is not supported under {ctx.engine.name} (it needs whole weights on "
                            "every process); use DDP (launch/multi_gpu_ddp.yaml) or one process, or set "
                            "`train.kl_to_base: null`.")
    with ctx.accelerator.main_process_first():  # tokenized once, like the training data; the rest read the cache
        examples = encode_weighted(section.datasets, ctx.tokenizer, recipe.data, DataStats(), recipe.train.seed)
    if not len(examples):
        raise KLToBaseError("no row of `train.kl_to_base.datasets` is left after skipping bad rows; fix the data or "
                            "list other datasets.")
    stream = PromptStream(examples, section.rows_per_step, recipe.train.seed)
    _checkpoint_with(ctx.accelerator, stream)
    collate = Collator(ctx.tokenizer.pad_token_id, mask_kind(ctx.model.config._attn_implementation,
                                                             recipe.data.packing, compiled=recipe.train.compile))
    base = None
    if recipe.lora is None:
        ctx.accelerator.print("kl_to_base: loading a frozen copy of the base model (full fine-tuning)")
        base = load_model(recipe.model, None).requires_grad_(False).eval().to(ctx.accelerator.device)
    return KLToBase(ctx.model, ctx.accelerator, stream, collate, section.weight, base, section.first_tokens)


def _checkpoint_with(accelerator, stream: PromptStream) -> None:
    """The stream's position goes into every checkpoint (a file of its own), so a resumed run draws the rows it would
    have drawn. Through save/load hooks, not `register_for_checkpointing`: accelerate refuses a checkpoint whose
    count of registered objects differs, which would break resuming with --accept-changes after turning the switch
    on or off."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            (Path(output_dir) / STATE_FILE).write_text(json.dumps(stream.state_dict()), encoding="utf-8")

    def load(models, input_dir):
        saved = Path(input_dir) / STATE_FILE
        if saved.is_file():
            stream.load_state_dict(json.loads(saved.read_text(encoding="utf-8")))
        else:
            accelerator.print(f"{input_dir} was saved without train.kl_to_base: its prompts start from the first")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


class PromptStream:
    """The KL rows of each update: the data in a seeded order, epoch after epoch, `rows` per update whatever the
    number of ranks that share them. Its own generator (not the global one dropout draws from), and its position is
    its whole state."""

    def __init__(self, examples, rows: int, seed: int):
        self.examples = examples.with_format(None)
        self.rows, self.seed, self.updates = rows, seed, 0
        self._epoch, self._order = -1, []

    def next_share(self, rank: int, world: int) -> list[list[tuple[list[int], list[int]]]]:
        """This rank's rows of the next update (one example each): rank r takes the update's rows r, r + world, ..."""
        first = self.updates * self.rows
        self.updates += 1
        return [[self._example(k)] for k in range(first + rank, first + self.rows, world)]

    def _example(self, k: int) -> tuple[list[int], list[int]]:
        epoch, i = divmod(k, len(self.examples))
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            random.Random(f"kl_to_base {self.seed} {epoch}").shuffle(self._order)
            self._epoch = epoch
        example = self.examples[self._order[i]]
        return example["input_ids"], example["target"]

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]


class KLToBase:
    """`weight * sum(KL(base || tuned)) / positions` over the target positions of each update's KL rows. `model` is
    the unwrapped model (the loss of a forward outside DDP's wrapper is not all-reduced by it; `apply` does that).
    `base` is a frozen copy of the base model, or None: the model itself with its LoRA adapter off."""

    name = "kl_to_base"

    def __init__(self, model, accelerator, stream: PromptStream, collate: Collator, weight: float, base=None,
                 first_tokens: int | None = None):
        self.model, self.accelerator, self.stream, self.collate = model, accelerator, stream, collate
        self.weight, self.base, self.first_tokens = weight, base, first_tokens
        self.params = [p for p in model.parameters() if p.requires_grad]

    def apply(self) -> torch.Tensor:
        """Adds the penalty's gradient to .grad (identical on every rank) and returns the penalty."""
        acc = self.accelerator
        rows = self.stream.next_share(acc.process_index, acc.num_processes)
        kl = positions = torch.zeros((), device=acc.device)
        grads = [None] * len(self.params)
        if rows:  # a rank without rows (fewer rows than ranks) adds nothing, but joins the sums
            with torch.enable_grad():
                kl, positions = self.kl_sum(rows)
                grads = torch.autograd.grad(kl, self.params, allow_unused=True)
        grads = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                 for p, g in zip(self.params, grads)]
        totals = torch.stack([kl.detach().double(), positions.double()])
        if acc.num_processes > 1:
            totals = acc.reduce(totals, "sum")
            _sum_over_ranks(acc, grads)
        scale = self.weight / max(totals[1].item(), 1.0)
        if acc.scaler is not None:  # fp16: .grad still holds the data gradient times the loss scale
            scale *= acc.scaler.get_scale()
        for p, g in zip(self.params, grads):
            g = g.mul_(scale).to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)
        return self.weight * totals[0] / totals[1].clamp(min=1)

    def kl_sum(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of KL(base || tuned) over the target positions of `rows` (a graph to the trained weights), and the
        number of those positions."""
        batch = send_to_device(self.collate(rows), self.accelerator.device)
        batch.pop("n_tokens")
        keep = batch.pop("labels") != IGNORE  # [rows, T]: positions whose next token is a target
        if self.first_tokens is not None:
            keep = first_of_each_run(keep, self.first_tokens)
        with torch.no_grad():
            base = _log_probs(self._base_logits(batch, keep))  # [positions, vocab]
        # The tuned model in the mode the loop keeps it in: dropout and activation checkpointing as for the task loss.
        tuned = _log_probs(logits_at(self.model, batch, keep))
        return F.kl_div(tuned, base, reduction="sum", log_target=True), keep.sum()

    def _base_logits(self, batch: dict, keep: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            with self.accelerator.autocast():  # the precision the tuned forward runs in: identical at step 0
                return logits_at(self.base, batch, keep)
        with eval_mode(self.model), self.model.disable_adapter():  # the base's own predictions, no dropout
            return logits_at(self.model, batch, keep)


def first_of_each_run(keep: torch.Tensor, n: int) -> torch.Tensor:
    """`keep` ([rows, T], bool) with only the first `n` positions of each run of consecutive true positions left
    true: the first tokens of each reply, where "spurious forgetting" (Zheng et al., ICLR 2025) finds a fine-tune
    overwrites the base's answer format."""
    k = keep.long()
    run_start = k.clone()
    run_start[:, 1:] = k[:, 1:] * (1 - k[:, :-1])  # 1 where a run begins
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(k)
    start_of_run = torch.zeros_like(k).masked_scatter_(run_start.bool(), positions[run_start.bool()])
    start = start_of_run.cummax(dim=1).values  # each position's run start (runs begin in increasing order)
    return keep & (positions - start < n)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _sum_over_ranks(accelerator, tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its sum over ranks, one all-reduce per BUCKET elements (or per larger tensor)."""
    start = 0
    while start < len(tensors):
        end, size = start, 0
        while end < len(tensors) and (end == start or size + tensors[end].numel() <= BUCKET):
            size += tensors[end].numel()
            end += 1
        group = tensors[start:end]
        summed = accelerator.reduce(torch.cat([t.flatten() for t in group]), "sum")
        for t, s in zip(group, summed.split([t.numel() for t in group])):
            t.copy_(s.view_as(t))
        start = end
