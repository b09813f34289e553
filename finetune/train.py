"""The Accelerate training loop: one optimizer update per `train_step`, logging and saving around it."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, send_to_device, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .budget import TrainingEval
from .checkpoint import (RunDir, atomic_write_text, checkpoint_step, latest_checkpoint, load_checkpoint,
                         save_checkpoint, write_recipe)
from .cpu import keep_freed_memory
from .data import IGNORE, Collator, RowDataset, build_datasets, mask_kind
from .errors import UserError
from .l2sp import PullToBase, diagonal_fisher, fisher_batches
from .model import count_parameters, load_model, load_tokenizer
from .preemption import Preempted, StopSignals
from .recipe import Recipe, flatten, recipe_to_dict


class TrainError(UserError):
    """A run that cannot go on as configured; the message says what to change."""


def make_accelerator(recipe: Recipe, run: RunDir) -> Accelerator:
    accelerator = Accelerator(
        # Without CUDA, accelerate only picks gloo DDP for launched ranks when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=recipe.train.grad_accum, sync_with_dataloader=False
        ),
        # The same permutation on every rank and in every run with this seed: resume and rank counts agree.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        log_with=recipe.train.trackers or None,
        project_dir=str(run.path),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes}: "
                         "each would train its own model. Launch with a config whose distributed_type matches "
                         "this machine (e.g. launch/cpu_ddp.yaml without GPUs).")
    # On CPU accelerate quietly turns FSDP and DeepSpeed launches into plain DDP; say so rather than train
    # with a memory layout the user did not ask for.
    for name, wanted in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(wanted, "false").lower() == "true" and accelerator.distributed_type.name != name:
            raise TrainError(f"the launch config asks for {name}, but accelerate set up "
                             f"{accelerator.distributed_type.name} (it supports {name} only on GPUs). On CPU use "
                             "launch/cpu_ddp.yaml.")
    return accelerator


class _SumCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over rows whose label is not IGNORE. The gradient (softmax - one-hot) is made in forward,
    a chunk of rows at a time, into one float32 buffer: autograd's version keeps the float32 log-softmax and makes
    two float32 gradients, each [tokens, vocab] (135M model, 8 x 256 tokens, fp32: 0.7 GB less peak memory)."""

    @staticmethod
    def forward(ctx, logits, labels):  # [N, vocab], [N]
        ctx.dtype = logits.dtype
        grad = torch.empty(logits.shape, device=logits.device) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), device=logits.device)
        step = max(1, 2**25 // logits.shape[1])  # rows per chunk: 128 MB of float32
        for start in range(0, len(labels), step):
            rows = slice(start, start + step)
            keep = labels[rows] != IGNORE
            target = labels[rows].where(keep, 0)[:, None]
            # Written straight into the gradient buffer, which then turns into softmax - one-hot in place.
            logp = torch.log_softmax(logits[rows].float(), dim=-1, out=grad[rows] if grad is not None else None)
            total -= logp.gather(1, target)[keep].sum()
            if grad is not None:
                logp.exp_().scatter_add_(1, target, -torch.ones_like(target, dtype=logp.dtype))
                logp[~keep] = 0
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        # In place (the graph is never retained, so this runs once), and cast after scaling, as autograd would.
        return grad.mul_(grad_total).to(ctx.dtype), None


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of cross-entropy over target tokens; labels are already shifted per example by the collator.
    The output head runs on target positions only: prompts and padding need no logits (SmolLM2-135M, chat data with
    22% of positions not targets: 6% less time a step)."""
    labels = batch.pop("labels")
    keep = labels != IGNORE  # [batch, T]
    head = getattr(model, "module", model).get_output_embeddings()  # .module: the model DDP/FSDP/DeepSpeed wrap
    # [batch, T, hidden] -> [targets, hidden] on the way into the head, inside the model's own forward.
    hook = head.register_forward_pre_hook(lambda module, args: (args[0][keep], *args[1:]))
    try:
        logits = model(**batch).logits  # [targets, vocab]
    finally:
        hook.remove()
    return _SumCrossEntropy.apply(logits, labels[keep])


def train_step(accelerator, model, optimizer, scheduler, micro_batches, max_grad_norm, pull=None):
    """One optimizer update over `grad_accum` micro-batches; the loss is the mean over every target token of the
    global batch, however it is split. Returns (local loss sum, local target count, grad norm, finite, L2-SP
    penalty); a non-finite gradient leaves weights, optimizer and schedule untouched."""
    # from_pretrained returns a model in eval mode, and evaluations between steps leave it there: without this,
    # dropout would be off and transformers would skip gradient checkpointing (it checkpoints only in training mode).
    model.train()
    local_targets = sum((mb["labels"] != IGNORE).sum() for mb in micro_batches)
    global_targets = accelerator.reduce(local_targets, "sum")
    # DDP averages gradients over ranks and accelerate divides by grad_accum: undo both so that the
    # gradient is that of sum(token losses) / global_targets.
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / global_targets.clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro_batches:
        with accelerator.accumulate(model):
            loss = token_loss_sum(model, batch)
            accelerator.backward(loss * scale)
            loss_sum += loss.detach()
    penalty = pull.apply() if pull is not None else torch.zeros((), device=accelerator.device)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    # Gradients are all-reduced, so every rank sees the same norm and takes the same decision.
    grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed clips inside its engine
    finite = math.isfinite(grad_norm) or accelerator.distributed_type.name == "DEEPSPEED"
    if finite or accelerator.scaler is not None:
        optimizer.step()  # under fp16 the grad scaler skips a non-finite update itself and lowers its scale
    if finite:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, local_targets, grad_norm, finite, penalty


@torch.no_grad()
def validation_loss(accelerator, model, rows: RowDataset, collate: Collator, batch_size: int) -> float:
    """Mean target-token loss over the whole validation set. Rows are split over ranks by hand and every rank
    runs the same number of forwards (a padded share contributes nothing), so FSDP collectives line up."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(rows), world))
    per_rank = math.ceil(len(rows) / world)
    total = torch.zeros(2, device=accelerator.device)
    for start in range(0, per_rank, batch_size):
        picked = mine[start:start + batch_size] or [0]
        batch = send_to_device(collate([rows[i] for i in picked]), accelerator.device)
        batch.pop("n_tokens")
        if not mine[start:start + batch_size]:
            batch["labels"].fill_(IGNORE)
        targets = (batch["labels"] != IGNORE).sum()
        total += torch.stack([token_loss_sum(model, batch), targets.float()])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def epoch_batches(accelerator, loader, grad_accum: int, epoch: int, skip: int):
    """(epoch, position, micro-batches) for every optimizer update, epoch after epoch. A trailing group of fewer
    than grad_accum micro-batches is left for the next epoch's shuffle: updates all have the same size."""
    while True:
        loader.set_epoch(epoch)
        source = accelerator.skip_first_batches(loader, skip) if skip else loader
        group, position = [], skip
        for batch in source:
            group.append(batch)
            position += 1
            if len(group) == grad_accum:
                yield epoch, position, group
                group = []
        epoch, skip = epoch + 1, 0


class MetricsLog:
    """metrics.jsonl on the main process (one JSON object per logged step) plus any accelerate trackers."""

    def __init__(self, accelerator, path: Path, resumed_step: int):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and path.exists():
            # Lines past the checkpoint we resume from describe steps that are about to be redone; a line cut
            # short by a crash is dropped too.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resumed_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _loaders(recipe: Recipe, tokenizer, accelerator, attn_implementation: str):
    with accelerator.main_process_first():  # tokenized once, then read from datasets' cache by the other ranks
        train_examples, val_examples, stats = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    collate = Collator(tokenizer.pad_token_id,
                       mask_kind(attn_implementation, recipe.data.packing, compiled=recipe.train.compile))
    train_rows = RowDataset(train_examples, recipe.data.max_length, recipe.data.packing)
    val_rows = RowDataset(val_examples, recipe.data.max_length, recipe.data.packing) if val_examples else None
    # A generator of its own: starting an epoch's iterator must not draw from the global RNG that dropout uses,
    # or a resumed run (which starts an iterator mid-epoch) would see different dropout masks.
    loader = torch.utils.data.DataLoader(train_rows, batch_size=recipe.train.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(recipe.train.seed))
    return loader, val_rows, collate, stats


def _optimizer(model, tr) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases and norms
    # fused: one kernel over all tensors instead of a loop of elementwise ops per tensor (CPU, 135M: 0.07 s a
    # step instead of 0.40).
    return torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr, betas=tuple(tr.betas), fused=True)


def train(recipe: Recipe, run: RunDir) -> torch.nn.Module:
    """Train as the recipe says, resuming from `run.resume_from`; returns the trained (unwrapped) model."""
    accelerator = make_accelerator(recipe, run)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # before the model and data exist, so their blocks come from the heap too
    tr = recipe.train
    if accelerator.is_main_process:
        write_recipe(run, recipe)  # also proves the folder is writable before minutes of loading
    # Seed before the model exists: LoRA's initial weights come from this generator.
    set_seed(tr.seed)
    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template)
    model = load_model(recipe.model, recipe.lora)
    if tr.compile:
        model.compile(dynamic=True)  # in place: state-dict keys, checkpoints and adapters stay as they are
    loader, val_rows, collate, stats = _loaders(recipe, tokenizer, accelerator, model.config._attn_implementation)
    rows = len(loader.dataset)
    model, optimizer, loader = accelerator.prepare(model, _optimizer(model, tr), loader)
    updates_per_epoch = len(loader) // tr.grad_accum
    if updates_per_epoch == 0:
        global_batch = tr.batch_size * tr.grad_accum * accelerator.num_processes
        raise TrainError(f"the training data makes {rows} rows, fewer than one update needs (batch_size x "
                         f"grad_accum x processes = {global_batch}); lower train.batch_size or train.grad_accum, "
                         "or add data.")
    max_steps = tr.max_steps or tr.epochs * updates_per_epoch
    # Not passed to prepare(): accelerate would step it once per process, and the schedule is per update.
    scheduler = get_scheduler(tr.schedule if tr.schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=tr.warmup_steps, num_training_steps=max_steps)
    accelerator.register_for_checkpointing(scheduler)
    if recipe.lora is not None:
        _checkpoint_adapter_only(accelerator)

    # Both before a checkpoint is loaded, while the weights are still the pretrained ones: theta_base for the
    # pull toward the base, and the base model's scores on the original tasks.
    pull = None
    if tr.l2sp:
        fisher = None
        if tr.l2sp_fisher is not None:
            if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
                raise TrainError(f"`train.l2sp_fisher` is not supported under {accelerator.distributed_type.name} "
                                 "(the Fisher pass needs whole weights); use it with DDP or one process, or set "
                                 "`train.l2sp_fisher: null`.")
            accelerator.print(f"measuring the base model's Fisher on {tr.l2sp_fisher.rows} examples (EWC)")
            with accelerator.main_process_first():  # tokenized once, like the training data; the rest read the cache
                batches = fisher_batches(tr.l2sp_fisher, recipe.data, tokenizer, tr.seed, accelerator.device)
            fisher = diagonal_fisher(accelerator.unwrap_model(model), batches, token_loss_sum)
        pull = PullToBase(accelerator.unwrap_model(model), tr.l2sp, fisher)
    evals = TrainingEval(recipe, run, accelerator, tokenizer, model,
                         checkpoint_step(run.resume_from) if run.resume_from else 0)
    progress = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "target_tokens": 0, "skipped_steps": 0}
    if run.resume_from is not None:
        progress = load_checkpoint(accelerator, run.resume_from)
        accelerator.print(f"resuming from {run.resume_from} (step {checkpoint_step(run.resume_from)} of {max_steps})")
    # Trackers take scalars only (tensorboard's hparams): lists, mappings and nulls go as JSON text.
    accelerator.init_trackers(run.path.name, config={
        k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        for k, v in flatten(recipe_to_dict(recipe)).items()})
    trainable, total = count_parameters(accelerator.unwrap_model(model))
    used_rows = updates_per_epoch * tr.grad_accum * tr.batch_size * accelerator.num_processes
    replayed = (f", {stats.replay_examples} of them replay ({stats.replay_tokens:,} of {stats.tokens:,} tokens)"
                if stats.replay_examples else "")
    accelerator.print(
        f"{stats.examples} examples{replayed} ({stats.skipped} bad rows skipped, {stats.truncated} truncated to "
        f"{recipe.data.max_length} tokens) in {rows} rows; {updates_per_epoch} updates per epoch use {used_rows} "
        f"rows each epoch (the other {rows - used_rows} fall to the next shuffle). Training {trainable:,} of "
        f"{total:,} parameters on {accelerator.num_processes} process(es), {max_steps} updates."
    )
    signals = StopSignals()
    try:
        last = _loop(recipe, run, accelerator, model, optimizer, scheduler, loader, val_rows, collate, progress,
                     max_steps, signals, pull, evals, tokenizer)
    finally:
        signals.restore()
    save_model(accelerator, model, tokenizer, run.final)
    evals.finish(last, model, tokenizer)
    accelerator.print(f"done: {run.final}")
    _end(accelerator)
    return accelerator.unwrap_model(model)


def _end(accelerator) -> None:
    """accelerate's end_training, with a pause before the process group goes.
    Workaround (torch 2.13, gloo): a gloo worker thread frees a finished collective's Python tensors just after
    the caller moved on, and needs the GIL for it; if the process group is destroyed at that moment, its
    destructor joins that thread while holding the GIL and both wait forever (seen at the end of 2-rank runs).
    Sleeping releases the GIL so the thread can finish first."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(0.2)
    accelerator.end_training()


def _loop(recipe, run, accelerator, model, optimizer, scheduler, loader, val_rows, collate, progress, max_steps,
          signals, pull, evals, tokenizer) -> int:
    """The updates from the resumed step to max_steps (or an earlier stop); returns the last step taken."""
    tr = recipe.train
    log = MetricsLog(accelerator, run.metrics, progress["step"])
    batches = epoch_batches(accelerator, loader, tr.grad_accum, progress["epoch"], progress["position"])
    bar = tqdm(total=max_steps, initial=progress["step"], disable=not accelerator.is_main_process, desc="training",
               unit="step")
    window = torch.zeros(3, device=accelerator.device)  # loss sum, target tokens, tokens since the last log
    clock, bad_in_row, step = time.perf_counter(), 0, progress["step"]
    for step in range(progress["step"] + 1, max_steps + 1):
        epoch, position, micro_batches = next(batches)
        tokens = sum(mb.pop("n_tokens") for mb in micro_batches)
        loss_sum, targets, grad_norm, finite, penalty = train_step(accelerator, model, optimizer, scheduler,
                                                                   micro_batches, tr.max_grad_norm, pull)
        progress.update(step=step, epoch=epoch, position=position)
        if finite:
            window += torch.stack([loss_sum, targets.float(), tokens.float()])
            bad_in_row = 0
        else:
            progress["skipped_steps"] += 1
            bad_in_row += 1
            accelerator.print(f"step {step}: non-finite loss or gradient; update skipped ({bad_in_row} in a row)")
            if bad_in_row > tr.max_nonfinite_in_row:
                last = latest_checkpoint(run.checkpoints)
                raise TrainError(f"{bad_in_row} updates in a row had a non-finite loss or gradient (step {step}); "
                                 f"stopping. Nothing non-finite was saved; the last checkpoint is {last}. Lower "
                                 "train.lr, set train.max_grad_norm, or use bf16 instead of fp16.")
        saving = bool(recipe.output.save_every) and step % recipe.output.save_every == 0 and step < max_steps
        stopping = signals.agreed(accelerator)
        # Log whenever a checkpoint is written, so a resumed run logs the same windows as an uninterrupted one.
        if step % tr.log_every == 0 or step == max_steps or saving or stopping:
            loss, n_targets, n_tokens = accelerator.reduce(window, "sum").tolist()
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            progress["tokens"] += int(n_tokens)
            progress["target_tokens"] += int(n_targets)
            record = {"step": step, "epoch": epoch, "loss": loss / max(n_targets, 1),
                      "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens": progress["tokens"], "target_tokens": progress["target_tokens"],
                      "tokens_per_s": n_tokens / elapsed, "skipped_steps": progress["skipped_steps"]}
            if pull is not None:
                record["l2sp"] = penalty.item()
            if val_rows is not None and (step == max_steps or (tr.eval_every and step % tr.eval_every == 0)):
                record["val_loss"] = validation_loss(accelerator, model, val_rows, collate, tr.batch_size)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window.zero_()
        bar.update(1)
        if evals.due(step, max_steps) and evals.check(
                step, model, tokenizer, save=lambda dest: save_model(accelerator, model, tokenizer, dest, True)):
            accelerator.print(f"stopping after step {step}: over the forgetting budget (eval.on_over_budget: stop)")
            break
        if saving or (stopping and step < max_steps):
            save_checkpoint(accelerator, run.checkpoints, step, progress, recipe.output.keep)
        if stopping and step < max_steps:
            bar.close()
            raise Preempted(f"stopped by signal after step {step}; checkpoint saved. Rerun the same command to "
                            "resume.")
    bar.close()
    return step


def _checkpoint_adapter_only(accelerator) -> None:
    """Checkpoints of a LoRA run hold the adapter, not a copy of the frozen base model. (Under FSDP and DeepSpeed
    accelerate saves the sharded model itself and these hooks see no models.)"""

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in names]:
                del state[key]

    def load_trainable(models, input_dir):
        from safetensors.torch import load_file

        # Popped models are left out of accelerate's own (strict) loading; FSDP and DeepSpeed pass none here.
        while models:
            i = len(models) - 1
            model = accelerator.unwrap_model(models.pop())
            state = load_file(Path(input_dir) / f"model{'' if i == 0 else f'_{i}'}.safetensors")
            result = model.load_state_dict(state, strict=False)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if result.unexpected_keys or trainable - set(state):
                raise TrainError(f"checkpoint {input_dir} does not match this adapter "
                                 f"(missing {sorted(trainable - set(state))[:3]}, "
                                 f"unexpected {result.unexpected_keys[:3]}).")

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def save_model(accelerator, model, tokenizer, dest: Path, replace: bool = False) -> None:
    """Collective. A Hugging Face folder (adapter or full weights, tokenizer included), written aside and renamed
    into place when complete. An existing `dest` is replaced only when asked (best/), never for final/."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    state = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            if not replace:
                raise TrainError(f"{dest} already exists; it was not overwritten. The new model is in {tmp}.")
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    accelerator.wait_for_everyone()
