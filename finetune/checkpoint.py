"""The run folder: start, resume or refuse; atomic checkpoints that resume trusts only when complete.

    runs/x/recipe.yaml            resolved recipe
    runs/x/metrics.jsonl          one line per logged step
    runs/x/checkpoints/step-N/    accelerate state (model or adapter, optimizer, scheduler, RNG) + progress.json
    runs/x/final/                 Hugging Face folder

A checkpoint is written into `checkpoints/.tmp-step-N/`, flushed to disk, and renamed into place only after every
rank has finished writing and `progress.json` lists every file with its size and SHA-256. Resume takes the newest
checkpoint whose files all match; anything else is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .recipe import Recipe, changed_keys, dump_recipe, recipe_to_dict

PROGRESS = "progress.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDirError(UserError):
    """The output folder cannot be used as asked; the message says why and which flag to pass."""


class CheckpointWriteError(UserError):
    """Writing a checkpoint failed (disk full, permissions); the message names what is still intact."""


@dataclass
class RunDir:
    path: Path
    resume_from: Path | None  # the newest complete checkpoint, if any
    finished: bool  # final/ exists: nothing left to train

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.path / "final"


def next_free_dir(path: Path) -> Path:
    """`runs/x-2`, `runs/x-3`, ...: the first sibling that does not exist yet."""
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return candidate


def open_run_dir(recipe: Recipe, accept_changes: bool) -> RunDir:
    """Decide whether this run starts, resumes or is refused. Reads only; the main process writes later."""
    path = Path(recipe.output.dir)
    saved = path / "recipe.yaml"
    if not path.exists() or not any(path.iterdir()):
        return RunDir(path, None, False)
    if not saved.is_file():
        raise RunDirError(f"{path} exists and is not a finetune run folder (no recipe.yaml); nothing in it will be "
                          "touched. Set `output.dir` to a new folder.")
    old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    changed = changed_keys(old, recipe_to_dict(recipe))
    if changed and not accept_changes:
        from .recipe import flatten

        before, after = flatten(old), flatten(recipe_to_dict(recipe))
        listed = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        raise RunDirError(f"{path} holds a run made with a different recipe ({listed}). Pass --accept-changes to "
                          "resume it with the new values, or --new-run to start over in a new folder.")
    run = RunDir(path, None, False)
    run.finished = (run.final / "config.json").is_file() or (run.final / "adapter_config.json").is_file()
    run.resume_from = latest_verified_checkpoint(run.checkpoints)
    return run


def write_recipe(run: RunDir, recipe: Recipe) -> None:
    """Write the resolved recipe; a previous one that differs is kept beside it, never overwritten."""
    try:
        run.path.mkdir(parents=True, exist_ok=True)
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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        print(f"warning: {path} does not match its recorded checksums; not resuming from it", file=sys.stderr)
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


def save_checkpoint(accelerator, root: Path, step: int, progress: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final folder. A failed write (disk full, permissions) removes
    its partial folder and raises CheckpointWriteError; earlier checkpoints are untouched."""
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: never trusted, safe to clear
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _save_state(accelerator, tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_text(tmp / PROGRESS, json.dumps({**progress, "files": files}, indent=1))
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


def load_checkpoint(accelerator, path: Path) -> dict:
    _load_state(accelerator, path)
    progress = json.loads((path / PROGRESS).read_text())
    del progress["files"]
    return progress


def _adapter_engine(accelerator) -> str | None:
    """"FSDP" or "DEEPSPEED" when a LoRA model is sharded by that engine: accelerate's save_state would then write the
    frozen base model into every checkpoint (its adapter-only hooks get no weights to trim under these engines)."""
    from accelerate.utils import is_peft_model

    engine = accelerator.distributed_type.name
    if engine in ("FSDP", "DEEPSPEED") and any(is_peft_model(accelerator.unwrap_model(m)) for m in accelerator._models):
        return engine
    return None


@contextmanager
def _models_saved_apart(accelerator):
    """save_state/load_state without the models and optimizers, which the caller saves or loads itself."""
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield zip(models, optimizers)
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def _save_state(accelerator, folder: Path) -> None:
    """accelerate's save_state, adapter only for a LoRA run under FSDP or DeepSpeed. Under FSDP, save_state writes the
    whole sharded model (a tiny Llama: 752 KB against 68 KB; an 8B model: ~16 GB a checkpoint), so the models and
    optimizers go through accelerate's FSDP functions with adapter_only, as transformers' Trainer saves them;
    DeepSpeed's engine leaves frozen weights out itself when asked."""
    engine = _adapter_engine(accelerator)
    if engine == "FSDP":
        from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        with _models_saved_apart(accelerator) as pairs:
            for i, (model, optimizer) in enumerate(pairs):
                save_fsdp_model(plugin, accelerator, model, str(folder), i, adapter_only=True)
                save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder), i)
            accelerator.save_state(str(folder))
    elif engine == "DEEPSPEED":
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
    else:
        accelerator.save_state(str(folder))


def _load_state(accelerator, folder: Path) -> None:
    engine = _adapter_engine(accelerator)
    if engine == "FSDP":
        from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

        plugin = accelerator.state.fsdp_plugin
        with _models_saved_apart(accelerator) as pairs:
            for i, (model, optimizer) in enumerate(pairs):
                load_fsdp_model(plugin, accelerator, model, str(folder), i, adapter_only=True)
                load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(folder), i)
            accelerator.load_state(str(folder))
    elif engine == "DEEPSPEED":
        accelerator.load_state(str(folder), load_module_strict=False)  # the frozen weights are not in the checkpoint
    else:
        accelerator.load_state(str(folder))


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush file contents and directory entries, so a power loss after the rename cannot leave empty files."""
    for p in [*(path.rglob("*") if recursive else ()), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
