"""The run folder: start, resume or refuse; atomic checkpoints that resume trusts only when complete.

    runs/x/recipe.yaml            resolved recipe (one it replaced is kept as recipe.before-N.yaml)
    runs/x/metrics.jsonl          one line per logged step
    runs/x/checkpoints/step-N/    accelerate state (model or adapter, optimizer, scheduler, RNG) + progress.json
    runs/x/final/                 Hugging Face folder, with README.md (the model card) and finetune.json (the base's
                                  local path, card.py)
    runs/x/forgetting/            the forgetting report (report.md, report.html, report.json)
    runs/x/best/                  while training, unless eval.on_over_budget is continue: the best model within
                                  the budget so far; at the end it becomes final/, and the last model moves to last/
    runs/x/last/                  the last model, when final/ is the best one
    runs/x/final.before-N/        a finished run trained on for longer: its final/, forgetting/ and last/ kept aside
    runs/x/forgetting.before-N/   (one N for the three)
    runs/x/last.before-N/

A checkpoint is written into `checkpoints/.tmp-step-N/`, flushed to disk, and renamed into place only after every
rank has finished writing and `progress.json` lists every file with its size and SHA-256. Resume takes the newest
checkpoint whose files all match; anything else is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError, print_main
from .files import atomic_write_text, next_free_dir
from .recipe import Recipe, changed_keys, dump_recipe, recipe_to_dict

PROGRESS = "progress.json"
FINAL_INFO = "finetune.json"  # in final/: the base model's hub name and local path (card.py writes it)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDirError(UserError):
    """The output folder cannot be used as asked; the message says why and which flag to pass."""


class CheckpointWriteError(UserError):
    """Writing a checkpoint failed (disk full, permissions); the message names what is still intact."""


@dataclass
class Progress:
    """Where a run stands after its last update; saved in every checkpoint, so a resumed run picks up exactly here."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    position: int = 0  # micro-batches of this epoch already consumed
    tokens: int = 0  # tokens trained on so far, padding excluded
    target_tokens: int = 0  # of which targets
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient


@dataclass
class RunDir:
    path: Path
    resume_from: Path | None  # the newest complete checkpoint, if any
    finished: bool  # final/ exists: nothing left to train
    note: str = ""  # what opening the folder decided, for the user (a restart, an extension)
    extending: bool = False  # a finished run trained on to a larger max_steps: final/ and the report are kept aside

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.path / "final"


# What may change when a finished run is trained on with --accept-changes: how long it trains.
_EXTENDING_KEYS = {"train.max_steps", "train.epochs"}


def _new_run_dir(out: Path) -> Path:
    """`out` itself while it does not exist, else its next free sibling."""
    free = next_free_dir(out) if out.exists() else out
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        # Each process would choose the next free folder by itself, before any of them can agree with the others: one
        # that looks after rank 0 has created dir-2 would take dir-3, and the ranks would train in different folders.
        raise RunDirError(f"--new-run works in a single process; in a launch of {processes} processes each would "
                          f"choose its own free folder. Name the new folder instead: output.dir={free}")
    return free


def open_run_dir(recipe: Recipe, accept_changes: bool, new_run: bool = False) -> RunDir:
    """Decide whether this run starts, resumes, is extended or is refused. Reads only; the main process writes later.
    `new_run`: an existing output.dir is left alone and the run goes to the next free sibling (recipe.output.dir is
    set to it)."""
    from .recipe import describe_changes

    if new_run:
        recipe.output.dir = str(_new_run_dir(Path(recipe.output.dir)))
    path = Path(recipe.output.dir)
    saved = path / "recipe.yaml"
    if path.exists() and not path.is_dir():
        raise RunDirError(f"`output.dir` {path} is a file, not a folder; set `output.dir` to a folder.")
    if not path.exists() or not any(path.iterdir()):
        return RunDir(path, None, False)
    if not saved.is_file():
        raise RunDirError(f"{path} exists and is not a finetune run folder (no recipe.yaml); nothing in it will be "
                          "touched. Set `output.dir` to a new folder.")
    old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    new = recipe_to_dict(recipe)
    changed = changed_keys(old, new)
    run = RunDir(path, None, False)
    run.finished = (run.final / "config.json").is_file() or (run.final / "adapter_config.json").is_file()
    run.resume_from = latest_verified_checkpoint(run.checkpoints)
    listed = "; ".join(describe_changes(old, new, changed))
    if not changed:
        return run
    if not run.finished and run.resume_from is None:
        # Nothing was kept that the new recipe would contradict: an attempt that failed before its first checkpoint
        # (a bad column, a typo) starts again from step 0 whatever changed.
        run.note = f"{path}: the earlier attempt left no checkpoint; starting over with the changed recipe ({listed})."
        return run
    if run.finished:
        if not accept_changes or not set(changed) <= _EXTENDING_KEYS or not _longer(old, new):
            raise RunDirError(
                f"{path} holds a finished run made with a different recipe ({listed}). A finished run can only be "
                "trained on for longer: raise train.max_steps and pass --accept-changes (it continues from the last "
                "checkpoint). For other changes, use --new-run to train in a new folder.")
        run.extending = True
        start = f"from {run.resume_from}" if run.resume_from else "from the start (the run kept no checkpoint)"
        until = (f"{new['train']['max_steps']} updates" if new["train"]["max_steps"] is not None
                 else f"{new['train']['epochs']} epochs")
        run.note = (f"{path}: training the finished run on to {until} {start}; its final/ and forgetting/ are kept "
                    "as final.before-N/ and forgetting.before-N/ (a last/ as last.before-N/).")
        return run
    if not accept_changes:
        raise RunDirError(f"{path} holds a run made with a different recipe ({listed}). Pass --accept-changes to "
                          "resume it with the new values, or --new-run to start over in a new folder.")
    return run


def _longer(old: dict, new: dict) -> bool:
    """The new recipe trains past where the old one ended (more updates, or more epochs when max_steps is null)."""
    (o_steps, n_steps), (o_epochs, n_epochs) = ((old["train"].get(k), new["train"].get(k))
                                                for k in ("max_steps", "epochs"))
    if n_steps is not None:
        return o_steps is not None and n_steps > o_steps
    return o_steps is None and n_epochs > o_epochs


def write_recipe(run: RunDir, recipe: Recipe) -> None:
    """Write the resolved recipe; a previous one that differs is kept beside it, never overwritten. A finished run
    being extended has its final/, forgetting/ and last/ kept aside first (final.before-N/ etc., one free N for all),
    so the longer run's own can be written where they belong."""
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        if run.extending and run.final.is_dir():
            kept = ("final", "forgetting", "last")  # last/: the last model when keep_best made final/ the best one
            n = 1
            while any((run.path / f"{name}.before-{n}").exists() for name in kept):
                n += 1
            if (run.path / "forgetting").is_dir():
                shutil.copytree(run.path / "forgetting", run.path / f"forgetting.before-{n}")
            if (run.path / "last").is_dir():
                os.replace(run.path / "last", run.path / f"last.before-{n}")
            os.replace(run.final, run.path / f"final.before-{n}")
        _write_recipe(run, recipe)
    except OSError as e:
        raise RunDirError(f"cannot write to the output folder {run.path}: {e.strerror or e}. Set `output.dir` to a "
                          "folder you can write to.") from e


def _write_recipe(run: RunDir, recipe: Recipe) -> None:
    target = run.path / "recipe.yaml"
    text = dump_recipe(recipe)
    if target.is_file() and target.read_text(encoding="utf-8") != text:
        n = 1
        while (kept := run.path / f"recipe.before-{n}.yaml").exists():
            n += 1
        os.replace(target, kept)
    atomic_write_text(target, text)


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose every listed file is present with its recorded size, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and _is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def latest_verified_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose checksums match; a corrupted one is reported and passed over."""
    for path in reversed(complete_checkpoints(root)):
        if verify(path):
            return path
        print_main(f"warning: {path} does not match its recorded checksums; not resuming from it", file=sys.stderr)
    return None


def _is_complete(path: Path) -> bool:
    """Cheap check used to list checkpoints: the record exists and every file has its recorded size."""
    try:
        files = json.loads((path / PROGRESS).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, (size, _) in files.items())


def verify(path: Path) -> bool:
    """Full check before resuming: every file's SHA-256 equals the one recorded when it was written."""
    files = json.loads((path / PROGRESS).read_text())["files"]
    return all(_digest(path / name) == [size, digest] for name, (size, digest) in files.items())


def _digest(path: Path) -> list:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return [path.stat().st_size, h.hexdigest()]


def save_checkpoint(accelerator, root: Path, progress: Progress, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final folder. A failed write (disk full, permissions) removes
    its partial folder and raises CheckpointWriteError; earlier checkpoints are untouched."""
    from .engine import save_state  # torch and accelerate only where a run saves (not for `finetune check`)

    tmp = root / f".tmp-step-{progress.step}"
    final = root / f"step-{progress.step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never trusted, safe to clear
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_state(accelerator, tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_text(tmp / PROGRESS, json.dumps({**dataclasses.asdict(progress), "files": files}, indent=1))
            _fsync_tree(tmp)
            if final.exists():
                # Only a checkpoint resume did not trust can sit here (a complete one would have been resumed from).
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(root, recursive=False)
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {e.strerror or e}. The previous checkpoint "
            f"({last or 'none yet'}) is intact; free space or fix permissions, then rerun the same command to "
            "resume.") from e
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> Progress:
    from .engine import load_state

    load_state(accelerator, path)
    saved = json.loads((path / PROGRESS).read_text())
    return Progress(**{f.name: saved[f.name] for f in dataclasses.fields(Progress)})


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush file contents and directory entries, so a power loss after the rename cannot leave empty files."""
    for p in [*(path.rglob("*") if recursive else ()), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- saving models


def keep_adapter_only(accelerator) -> None:
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
                raise RunDirError(f"checkpoint {input_dir} does not match this adapter "
                                  f"(missing {sorted(trainable - set(state))[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]}).")

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def without_tied_copies(model, state: dict) -> dict:
    """The gathered state without the second copy of tied weights. save_pretrained finds tied weights by shared
    storage, which gathered copies no longer have: a tied-embedding model would get an extra lm_head.weight in
    final/. `model` is the unwrapped model; its tie map (target: source) names the copies to drop."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state.items() if not (k in tied and tied[k] in state)}


def save_model(accelerator, model, tokenizer, dest: Path, replace: bool = False) -> None:
    """Collective. A Hugging Face folder (adapter or full weights, tokenizer included), written aside and renamed
    into place when complete. An existing `dest` is replaced only when asked (best/), never for final/."""

    tmp = dest.with_name(f".tmp-{dest.name}")
    state = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=without_tied_copies(unwrapped, state), safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            if not replace:
                raise RunDirError(f"{dest} already exists; it was not overwritten. The new model is in {tmp}.")
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    accelerator.wait_for_everyone()


def final_folder(path: Path) -> Path:
    """The saved model a path means: a run folder means its final/; any other folder is itself."""
    return path / "final" if (path / "final").is_dir() else path


def merge_source(adapter: Path, out: Path) -> Path:
    """The adapter folder `finetune merge` folds into its base, checked before anything heavy is imported: a run
    folder means its final/, which must hold a LoRA adapter, and `out` must be new or empty (nothing overwritten)."""
    adapter = final_folder(adapter)
    if not (adapter / "adapter_config.json").is_file():
        what = ("a full model (config.json, no adapter): it is standalone already, nothing to merge"
                if (adapter / "config.json").is_file() else "no LoRA adapter (adapter_config.json)")
        raise RunDirError(f"{adapter} holds {what}. merge takes a LoRA run folder or its final/.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; merge writes only into a new or empty "
                              "folder, so nothing of yours is overwritten. Choose another output folder.")
    return adapter


def local_base(folder: Path) -> str | None:
    """The base model's local folder recorded in a saved final/ (FINAL_INFO), if it is still there: what finetune's
    own commands load an adapter on before the hub name in adapter_config.json."""
    info = folder / FINAL_INFO
    if not info.is_file():
        return None
    path = json.loads(info.read_text(encoding="utf-8")).get("base_model_path")
    return path if path and Path(path).is_dir() else None
