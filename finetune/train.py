"""The Accelerate training loop, read top to bottom:

    train(recipe, run)
        _set_up          accelerator, tokenizer, model, batches, optimizer, schedule, mitigations, evaluation
        resume           from the newest verified checkpoint, at its exact data position and RNG state
        _loop            one `train_step` per optimizer update; logging, validation, forgetting evaluation,
                         checkpoints and signals around it
        save final/      then the forgetting report

Which engine runs the model (one process, DDP, FSDP, DeepSpeed) is engine.py's business; the loop asks it what the
engine can do and never branches on its name.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device, set_seed
from transformers import get_scheduler

from . import mitigations, pruning
from .card import write_model_card
from .checkpoint import (Progress, RunDir, checkpoint_step, keep_adapter_only, latest_checkpoint, load_checkpoint,
                         save_checkpoint, save_model, write_recipe)
from .files import atomic_write_text, read_jsonl
from .cpu import keep_freed_memory
from .data import IGNORE, Collator, RowDataset, build_datasets, mask_kind
from .engine import Engine, engine, make_accelerator
from .errors import UserError
from .loss import token_loss_sum
from .model import count_parameters, load_model
from .model_files import load_tokenizer
from .preemption import Preempted, StopSignals
from .probes import Probes
from .progress import TrainingDisplay, summary
from .recipe import Recipe, flatten, recipe_to_dict
from .reports.forecast import describe as describe_forecast
from .training_eval import TrainingEval


class TrainError(UserError):
    """A run that cannot go on as configured; the message says what to change."""


# ---------------------------------------------------------------- the step


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's sum of target-token losses
    targets: torch.Tensor  # this rank's target tokens
    grad_norm: float  # of the whole gradient, before clipping; nan where the engine clips inside itself
    finite: bool  # False: the update was skipped, weights, optimizer and schedule untouched
    penalties: dict[str, torch.Tensor] = field(default_factory=dict)  # each regularizer's penalty, by name


def train_step(accelerator, model, optimizer, scheduler, micro_batches, max_grad_norm, regularizers=(),
               clips_inside: bool = False) -> StepResult:
    """One optimizer update over `grad_accum` micro-batches; the loss is the mean over every target token of the
    global batch, however it is split into micro-batches and processes."""
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
    penalties = {r.name: r.apply() for r in regularizers}
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    # Gradients are all-reduced, so every rank sees the same norm and takes the same decision.
    grad_norm = math.nan if grad_norm is None else float(grad_norm)
    finite = math.isfinite(grad_norm) or clips_inside
    if finite or accelerator.scaler is not None:
        optimizer.step()  # under fp16 the grad scaler skips a non-finite update itself and lowers its scale
    if finite:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, local_targets, grad_norm, finite, penalties)


# ---------------------------------------------------------------- around the step


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
            # Lines past the checkpoint we resume from describe steps that are about to be redone.
            kept = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("step", math.inf) <= resumed_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        # Trackers take numbers: the forecast (a nested record) goes to metrics.jsonl only.
        self.accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                             step=record["step"])


# ---------------------------------------------------------------- set-up


@dataclass
class Training:
    """What the loop works with, set up once by `_set_up`."""

    recipe: Recipe
    run: RunDir
    accelerator: Any
    engine: Engine
    tokenizer: Any
    model: torch.nn.Module  # as prepared by accelerate (wrapped under DDP/FSDP/DeepSpeed)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: torch.utils.data.DataLoader
    collate: Collator
    val_rows: RowDataset | None
    regularizers: list  # mitigations.Regularizer
    at_end: list  # mitigations' changes after the last update (mitigations.at_end)
    evals: TrainingEval
    probes: Probes
    max_steps: int


def _loaders(recipe: Recipe, tokenizer, accelerator, attn_implementation: str):
    with accelerator.main_process_first():  # tokenized once, then read from datasets' cache by the other ranks
        train_examples, val_examples, stats = build_datasets(recipe.data, tokenizer, recipe.train.seed)
        train_examples = mitigations.mix(recipe, train_examples, tokenizer, stats)
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


def _set_up(recipe: Recipe, run: RunDir) -> Training:
    accelerator = make_accelerator(recipe, str(run.path))
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
        keep_adapter_only(accelerator)
    # Both before a checkpoint is loaded, while the weights are still the pretrained ones: what the regularizers
    # pull toward, and the base model's scores on the original tasks.
    running = engine(accelerator)
    context = mitigations.Context(accelerator, running, accelerator.unwrap_model(model), tokenizer)
    regularizers = mitigations.regularizers(recipe, context)
    at_end = mitigations.at_end(recipe, context)
    evals = TrainingEval(recipe, run, accelerator, tokenizer, model,
                         checkpoint_step(run.resume_from) if run.resume_from else 0)
    probes = Probes(recipe, accelerator, model, tokenizer, max_steps)
    trainable, total = count_parameters(accelerator.unwrap_model(model))
    used_rows = updates_per_epoch * tr.grad_accum * tr.batch_size * accelerator.num_processes
    mixed = (f", {stats.mixed_examples} of them {' and '.join(stats.mixed_by)} ({stats.mixed_tokens:,} of "
             f"{stats.tokens:,} tokens)" if stats.mixed_examples else "")
    accelerator.print(
        f"{stats.examples} examples{mixed} ({stats.skipped} bad rows skipped, {stats.truncated} truncated to "
        f"{recipe.data.max_length} tokens) in {rows} rows; {updates_per_epoch} updates per epoch use {used_rows} "
        f"rows each epoch (the other {rows - used_rows} fall to the next shuffle). Training {trainable:,} of "
        f"{total:,} parameters on {accelerator.num_processes} process(es), {max_steps} updates."
    )
    if probes.steps:
        accelerator.print(probes.describe())
    return Training(recipe, run, accelerator, running, tokenizer, model, optimizer, scheduler, loader, collate,
                    val_rows, regularizers, at_end, evals, probes, max_steps)


# ---------------------------------------------------------------- the run


def train(recipe: Recipe, run: RunDir) -> torch.nn.Module:
    """Train as the recipe says, resuming from `run.resume_from`; returns the trained (unwrapped) model."""
    started = time.monotonic()
    t = _set_up(recipe, run)
    progress = Progress()
    if run.resume_from is not None:
        progress = load_checkpoint(t.accelerator, run.resume_from)
        t.accelerator.print(f"resuming from {run.resume_from} (step {progress.step} of {t.max_steps})")
    # Trackers take scalars only (tensorboard's hparams): lists, mappings and nulls go as JSON text.
    t.accelerator.init_trackers(run.path.name, config={
        k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        for k, v in flatten(recipe_to_dict(recipe)).items()})
    signals = StopSignals()
    looped = time.monotonic()
    try:
        last = _loop(t, progress, signals)
    finally:
        signals.restore()
    looped = time.monotonic() - looped
    for change in t.at_end:
        change()
    save_model(t.accelerator, t.model, t.tokenizer, run.final)
    t.evals.finish(last, t.model, t.tokenizer)
    if t.accelerator.is_main_process:  # the summary reads all of metrics.jsonl: only where it is shown
        write_model_card(recipe, run)  # after the report, whose verdict it carries
        evals = t.evals.seconds
        print(summary(run, time.monotonic() - started, {
            "updates": looped - evals["during"],
            **({"evaluation": evals["base"] + evals["during"] + evals["last"], "base": evals["base"]}
               if t.evals.enabled else {})}))
    _end(t.accelerator)
    return t.accelerator.unwrap_model(t.model)


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


def _loop(t: Training, progress: Progress, signals: StopSignals) -> int:
    """The updates from the resumed step to max_steps (or an earlier stop); returns the last step taken."""
    recipe, tr, accelerator = t.recipe, t.recipe.train, t.accelerator
    log = MetricsLog(accelerator, t.run.metrics, progress.step)
    batches = epoch_batches(accelerator, t.loader, tr.grad_accum, progress.epoch, progress.position)
    bar = TrainingDisplay(accelerator.is_main_process, t.max_steps, progress.step)
    window = torch.zeros(3, device=accelerator.device)  # loss sum, target tokens, tokens since the last log
    clock, bad_in_row, step = time.perf_counter(), 0, progress.step
    began, resumed = clock, progress.step
    for step in range(progress.step + 1, t.max_steps + 1):
        epoch, position, micro_batches = next(batches)
        tokens = sum(mb.pop("n_tokens") for mb in micro_batches)
        result = train_step(accelerator, t.model, t.optimizer, t.scheduler, micro_batches, tr.max_grad_norm,
                            t.regularizers, t.engine.clips_inside)
        progress.step, progress.epoch, progress.position = step, epoch, position
        if result.finite:
            window += torch.stack([result.loss_sum, result.targets.float(), tokens.float()])
            bad_in_row = 0
        else:
            progress.skipped_steps += 1
            bad_in_row += 1
            bar.note(f"step {step}: non-finite loss or gradient; update skipped ({bad_in_row} in a row)")
            if bad_in_row > tr.max_nonfinite_in_row:
                raise TrainError(f"{bad_in_row} updates in a row had a non-finite loss or gradient (step {step}); "
                                 f"stopping. Nothing non-finite was saved; the last checkpoint is "
                                 f"{latest_checkpoint(t.run.checkpoints)}. Lower train.lr, set train.max_grad_norm, "
                                 "or use bf16 instead of fp16.")
        saving = bool(recipe.output.save_every) and step % recipe.output.save_every == 0 and step < t.max_steps
        stopping = signals.agreed(accelerator)
        # The updates' time: this process's, less its evaluations during training (the probes' own, Probes takes off).
        updating = time.perf_counter() - began - t.evals.seconds["during"]
        probed, forecast = t.probes.due(step, updating, step - resumed), None
        if not probed and t.probes.left_out[:1] == [step]:
            bar.note(t.probes.left_out_text())
        # Log whenever a checkpoint is written, so a resumed run logs the same windows as an uninterrupted one.
        if step % tr.log_every == 0 or step == t.max_steps or saving or stopping or probed:
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            record = _record(t, progress, result, accelerator.reduce(window, "sum").tolist(), elapsed)
            if probed:
                probes = t.probes.measure(t.model)
                record.update(probes, seconds_probing=t.probes.last)
                if forecast := t.probes.forecast(step, probes):
                    record["forecast"] = forecast = _stop_on(recipe, pruning.decide(accelerator, forecast, step))
            log.write(record)
            bar.record(record)
            window.zero_()
            if forecast:
                bar.note(describe_forecast(forecast))
        bar.step()
        if forecast and forecast.get("pruned"):
            bar.note(f"stopping after step {step}: pruned by the sweep (forecast odds of FAIL "
                     f"{forecast['pruned']['fail_odds']:.2f}); measured here, marked pruned in its report")
            break
        if forecast and forecast.get("stopped"):
            bar.note(f"stopping after step {step}: the forecast is FAIL beyond doubt (odds "
                     f"{forecast['stopped']['fail_odds']:.2f}; eval.on_over_budget: stop)")
            break
        if t.evals.due(step, t.max_steps) and t.evals.check(
                step, t.model, t.tokenizer,
                save=lambda dest: save_model(accelerator, t.model, t.tokenizer, dest, True)):
            bar.note(f"stopping after step {step}: over the forgetting budget (eval.on_over_budget: stop)")
            break
        if saving or (stopping and step < t.max_steps):
            save_checkpoint(accelerator, t.run.checkpoints, progress, recipe.output.keep)
        if stopping and step < t.max_steps:
            bar.close()
            raise Preempted(f"stopped by signal after step {step}; checkpoint saved. Rerun the same command to "
                            "resume.")
    bar.close()
    return step


def _stop_on(recipe: Recipe, forecast: dict) -> dict:
    """The forecast, marked `stopped` where `eval.on_over_budget: stop` ends the run on it (FAIL beyond doubt, and
    not already pruned), so its report, a comparison and a calibration file know it was measured part-trained."""
    if forecast.get("pruned") or recipe.eval.on_over_budget != "stop" or not (
            forecast["verdict"] == "FAIL" and forecast["beyond_doubt"]):
        return forecast
    return {**forecast, "stopped": {"step": forecast["step"], "fail_odds": forecast["vouched"]["FAIL"]}}


def _record(t: Training, progress: Progress, result: StepResult, window: list[float], elapsed: float) -> dict:
    """The metrics.jsonl line for the updates since the last one: `window` holds their summed loss, target tokens
    and tokens over all ranks."""
    loss, n_targets, n_tokens = window
    progress.tokens += int(n_tokens)
    progress.target_tokens += int(n_targets)
    record = {"step": progress.step, "epoch": progress.epoch, "loss": loss / max(n_targets, 1),
              "lr": t.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm, "tokens": progress.tokens,
              "target_tokens": progress.target_tokens, "tokens_per_s": n_tokens / elapsed,
              "skipped_steps": progress.skipped_steps}
    record.update({name: penalty.item() for name, penalty in result.penalties.items()})
    tr = t.recipe.train
    if t.val_rows is not None and (progress.step == t.max_steps or (tr.eval_every and progress.step % tr.eval_every == 0)):
        record["val_loss"] = validation_loss(t.accelerator, t.model, t.val_rows, t.collate, tr.batch_size)
    return record
