"""Original-task evaluation: lm-evaluation-harness on in-memory models, the base model's results cached, and the
measurements a run makes (the base before training, the tuned model after, optionally every `eval.every` updates).

Evaluation runs on the main process only, on the unwrapped model: ranks do not share the work (lm-eval splits
requests over ranks only for models it loads itself), so the other ranks wait at a barrier. That model must hold
all its weights: under FSDP or DeepSpeed ZeRO-3, measure the saved final/ afterwards (`evaluate_saved`). Scoring is
lm-eval's; this module only picks each task's primary metric and keeps the per-example scores, keyed by
document, so that base and tuned can be compared example by example.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_text, read_jsonl
from .drift import DEFAULT_PROMPTS, NEW_TOKENS, SAMPLING_SEED, AdapterDisabled, eval_mode, kl_drift, read_texts, \
    sample_texts
from .errors import UserError
from .model import load_model, load_tokenizer, resolve_model_path
from .quiet import silence_lm_eval
from .recipe import EvalSection, ModelSection, Recipe
from .records import Evaluation, TaskScore, from_dict, to_dict
from .report import build_report, provenance, write_report

# In order of preference: the length-normalised accuracy is the one lm-eval's model cards quote for
# multiple-choice tasks; exact_match is what generation tasks report.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match")


class EvalError(UserError):
    """A task that cannot be evaluated as named; the message says which and why."""


# ---------------------------------------------------------------- lm-eval


@functools.lru_cache(maxsize=1)
def _registered_tasks():
    """lm-eval's index of its own ~15k task configs: seconds to build, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _folder_tasks(folder: str | None):
    """An index of one folder's task configs (none for None), built afresh: cheap, and never stale."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=False)


def load_tasks(spec: str) -> tuple[str, dict]:
    """(name, {leaf name: lm-eval Task}) for a registered task, group or tag, or a task YAML file (loaded with
    its folder as include path, so it may include or list its siblings); the name is lm-eval's for it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if spec.endswith((".yaml", ".yml")):
        path = Path(spec).expanduser()
        config = load_yaml(path, resolve_func=False) if path.is_file() else {}
        # A group file lists its tasks under `task:`, so the name is `task` only where that is one name (lm-eval
        # 0.4.13's own TaskIndex.entry_from_path takes the list as the name and fails).
        name = config.get("task") if isinstance(config.get("task"), str) else config.get("group")
        if not isinstance(name, str):
            raise EvalError(f"task file {spec} does not exist or declares no `task:` or `group:` name (paths are "
                            f"relative to the folder you run from, {Path.cwd()}).")
        manager = _folder_tasks(str(path.resolve().parent))
    else:
        manager, name = _registered_tasks(), spec
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise EvalError(f"unknown lm-eval task `{spec}`.{hint} A local task is given as the path of its YAML "
                            "file.")
    return name, manager.load([name])["tasks"]


@contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds python, numpy and torch globally, and loading datasets draws from python's generator; a run
    evaluated mid-training goes on with the random streams it had, so evaluating does not change what is trained."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """HFLM warns that an in-memory model is not a string and may not be launched with accelerate: both are how
    we use it on purpose, and the warnings would read as problems in every run's output."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _evaluate_loaded(model, tokenizer, loaded: dict[str, dict], *, batch_size: int, limit: int | None,
                     chat: bool = False):
    """One lm-eval pass over every spec's tasks (its set-up costs seconds, so one call, not one per task)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    silence_lm_eval()
    if not loaded:
        return {}  # no tasks: the drift alone measures forgetting
    leaves = [task for _, tasks in loaded.values() for task in tasks.values()]
    with eval_mode(model), _quiet(logging.getLogger("lm_eval.models.huggingface")):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # Tasks go in as objects, with an empty index: lm-eval would otherwise re-scan its 15k configs per call.
        # Its bootstrap standard errors are skipped: the report's intervals are paired, over the same examples.
        # With `chat`, prompts go through the tokenizer's chat template (few-shot examples as earlier turns), as
        # an instruct model is prompted and as chat-format training data is rendered.
        out = lm_eval.simple_evaluate(lm, tasks=leaves, task_manager=_folder_tasks(None), limit=limit,
                                      log_samples=True, bootstrap_iters=0, apply_chat_template=chat,
                                      fewshot_as_multiturn=chat)
    return {spec: _score(name, tasks, out) for spec, (name, tasks) in loaded.items()}


def _score(name: str, tasks: dict, out: dict) -> TaskScore:
    leaves = sorted(tasks)
    # Results are keyed "metric,filter". A task with several filters (e.g. strict and flexible answer
    # extraction) reports each metric once per filter: the first listed is taken, as in lm-eval's own tables.
    reported = [key.split(",", 1) for key in out["results"][leaves[0]] if "," in key]
    metric = next((m for m in PRIMARY_METRICS if any(r[0] == m for r in reported)), None)
    if metric is None:
        raise EvalError(f"task {name} reports {sorted({m for m, _ in reported if not m.endswith('_stderr')})}; "
                        f"forgetting is measured on one of {', '.join(PRIMARY_METRICS)}.")
    filter_name = next(f for m, f in reported if m == metric)
    examples = {}
    for leaf in leaves:
        for sample in sorted(out["samples"][leaf], key=lambda s: s["doc_id"]):
            if sample["filter"] == filter_name:
                examples[f"{leaf}/{sample['doc_id']}"] = float(sample[metric])
    # One task: lm-eval's aggregate. A group: the mean over all its examples (lm-eval's group mean may weight
    # its tasks equally instead, which the per-example pairing could not reproduce).
    value = out["results"][leaves[0]][f"{metric},{filter_name}"] if len(leaves) == 1 else \
        sum(examples.values()) / len(examples)
    return TaskScore(task=name, metric=metric, value=float(value), examples=examples)


@_preserved_rng()
def evaluate_tasks(model, tokenizer, tasks: list[str], *, batch_size: int, limit: int | None,
                   chat: bool = False) -> dict[str, TaskScore]:
    """{spec: TaskScore} for lm-eval task names or task YAML files, scored by lm-eval on an in-memory model."""
    loaded = {spec: load_tasks(spec) for spec in tasks}
    return _evaluate_loaded(model, tokenizer, loaded, batch_size=batch_size, limit=limit, chat=chat)


# ---------------------------------------------------------------- caches


def model_identity(section: ModelSection) -> dict:
    """What names the base weights in cache keys: their folder with each file's size and modification time (a
    hub model's is its snapshot folder, named by commit), and the dtype they are loaded in."""
    path = resolve_model_path(section)
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=section.revision, local_files_only=True)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).iterdir())
             if p.suffix in (".safetensors", ".bin", ".json")}
    return {"path": str(Path(path).resolve()), "files": files, "dtype": section.dtype}


def _stable(value) -> str:
    """A JSON stand-in for what task configs hold besides data (functions): their name, never their address."""
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"


def task_fingerprint(tasks: dict, limit: int | None) -> str:
    """A hash of what decides a task's score besides the model: every leaf task's config and the documents
    evaluated (content, not file names: a data file edited in place gets a new fingerprint)."""
    digest = hashlib.sha256()
    for name in sorted(tasks):
        task = tasks[name]
        docs = task.eval_docs
        n = len(docs) if limit is None else min(limit, len(docs))
        digest.update(json.dumps([name, task.dump_config()], sort_keys=True, default=_stable).encode())
        for i in range(n):
            digest.update(json.dumps(docs[i], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    """Written aside, then renamed: a crash never leaves half a cache file that a later run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value))


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- a run's measurements


def _is_peft(model) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


class ForgettingEval:
    """Forgetting of one run, measured against its base model. Main process only; the calls, in order:

        fe = ForgettingEval(recipe.eval, recipe.model, tokenizer, curve_file=run/"forgetting"/"curve.jsonl",
                            resumed_step=progress["step"])
        fe.evaluate_base(model)          # before training; cached across runs of the same base, tasks and settings
        fe.evaluate(model, step)         # every eval.every updates, and after the last: appended to fe.curve

    `model` is the unwrapped model being trained. A peft model is its own base with the adapter switched off;
    for full fine-tuning the base is loaded again from model.path for the drift, then freed.
    """

    def __init__(self, section: EvalSection, model_section: ModelSection, tokenizer, *,
                 curve_file: Path | None = None, resumed_step: int = 0):
        both = set(section.tasks) & set(section.target_tasks)
        if both:
            raise EvalError(f"{sorted(both)} are listed in both eval.tasks and eval.target_tasks; a task measures "
                            "either what must not be forgotten or what is learned.")
        self.section, self.model_section, self.tokenizer = section, model_section, tokenizer
        self.cache_dir = Path(model_section.cache_dir).expanduser()
        self.identity = model_identity(model_section)
        self.texts = read_texts(section.drift_texts)  # empty: sampled from the base in evaluate_base
        self.base: Evaluation | None = None
        self.curve_file = curve_file
        self.curve: list[Evaluation] = []  # every tuned evaluation, in step order
        if curve_file is not None and curve_file.is_file():
            # Points past the checkpoint we resume from describe updates that are about to be redone.
            points = [from_dict(Evaluation, d) for d in read_jsonl(curve_file)]
            self.curve = [e for e in points if e.step <= resumed_step]
            atomic_write_text(curve_file, "".join(json.dumps(to_dict(e)) + "\n" for e in self.curve))

    def _cache_path(self, kind: str, *parts) -> Path:
        key = hashlib.sha256(json.dumps([self.identity, *parts], sort_keys=True, default=str).encode())
        return self.cache_dir / kind / f"{key.hexdigest()[:20]}.json"

    @_preserved_rng()
    def evaluate_base(self, model=None) -> Evaluation:
        """The base model's scores, and the default drift texts it samples; each from the cache under
        <model.cache_dir> when this base was measured the same way before. `model` holds the base weights (the
        model about to be trained; a peft model's adapter is switched off), or None to load them when needed."""
        specs = self.section.tasks + self.section.target_tasks
        settings = {"lm_eval": version("lm_eval"), "limit": self.section.limit, "batch_size": self.section.batch_size,
                    "chat": self.section.apply_chat_template}
        loaded = {spec: load_tasks(spec) for spec in specs}
        paths = {spec: self._cache_path("base_eval", settings, task_fingerprint(tasks, self.section.limit))
                 for spec, (_, tasks) in loaded.items()}
        scores = {spec: from_dict(TaskScore, _read_json(path)) for spec, path in paths.items() if path.is_file()}
        missing = {spec: loaded[spec] for spec in specs if spec not in scores}
        texts_path = self._cache_path("drift", DEFAULT_PROMPTS, NEW_TOKENS, SAMPLING_SEED)
        sample = not self.texts and not texts_path.is_file()
        if missing or sample:
            with self._plain_base(model) as base:
                if missing:
                    fresh = _evaluate_loaded(base, self.tokenizer, missing, batch_size=self.section.batch_size,
                                             limit=self.section.limit, chat=self.section.apply_chat_template)
                    for spec, score in fresh.items():
                        _write_json(paths[spec], to_dict(score))
                        scores[spec] = score
                if sample:
                    _write_json(texts_path, sample_texts(base, self.tokenizer, DEFAULT_PROMPTS,
                                                         new_tokens=NEW_TOKENS, seed=SAMPLING_SEED))
        if not self.texts:
            self.texts = _read_json(texts_path)
        self.base = Evaluation(step=0, tasks={s: scores[s] for s in self.section.tasks},
                               targets={s: scores[s] for s in self.section.target_tasks})
        return self.base

    @_preserved_rng()
    def evaluate(self, model, step: int | None) -> Evaluation:
        """Scores and drift of the model after `step` updates; appended to `curve` (and to the curve file)."""
        if self.base is None:
            raise RuntimeError("evaluate_base() must run first: the drift is measured on the base's texts")
        scores = evaluate_tasks(model, self.tokenizer, self.section.tasks + self.section.target_tasks,
                                batch_size=self.section.batch_size, limit=self.section.limit,
                                chat=self.section.apply_chat_template)
        drift = kl_drift(self._base_beside(model), model, self.tokenizer, self.texts,
                         max_length=self.section.drift_max_length)
        point = Evaluation(step=step, tasks={s: scores[s] for s in self.section.tasks},
                           targets={s: scores[s] for s in self.section.target_tasks}, drift=drift)
        self.curve.append(point)
        if self.curve_file is not None:
            self.curve_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.curve_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(to_dict(point)) + "\n")
        return point

    def _load_base(self, device: torch.device):
        return load_model(self.model_section, None).to(device)

    @contextmanager
    def _plain_base(self, model):
        """The base as a model lm-eval and generate() accept."""
        if model is None:
            yield self._load_base(eval_device())
        elif _is_peft(model):
            with model.disable_adapter():
                yield model
        else:
            yield model

    def _base_beside(self, tuned):
        """The base alive next to the tuned model, for the drift: the same weights with the adapter off, or a copy
        (freed when the caller lets go of it)."""
        if _is_peft(tuned):
            return AdapterDisabled(tuned)
        return self._load_base(next(tuned.parameters()).device)


def load_tuned(base: ModelSection, folder: Path):
    """A saved model to measure, on the device evaluation runs on: a peft adapter folder (on `base`) or a full model
    folder; a run folder means its final/. Returns (model, whether it is an adapter)."""
    import peft

    folder = folder / "final" if (folder / "final").is_dir() else folder
    if (folder / "adapter_config.json").is_file():
        model, is_adapter = peft.PeftModel.from_pretrained(load_model(base, None), folder), True
    elif (folder / "config.json").is_file():
        model = load_model(ModelSection(path=str(folder), dtype=base.dtype, cache_dir=base.cache_dir), None)
        is_adapter = False
    else:
        raise EvalError(f"{folder} holds neither a peft adapter (adapter_config.json) nor a model (config.json).")
    return model.to(eval_device()), is_adapter


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_saved(base: ModelSection, tuned: Path, section: EvalSection, chat_template: str | None):
    """(ForgettingEval with the base measured, tuned model, whether it is an adapter): how `finetune eval` and
    `finetune interpolate` both start. For an adapter, one copy of the base serves both (its adapter switched off
    for the base); for a full model a second copy is loaded only if the cache lacks the base's scores."""
    fe = ForgettingEval(section, base, load_tokenizer(base, chat_template))
    model, is_adapter = load_tuned(base, Path(tuned))
    fe.evaluate_base(model if is_adapter else None)
    return fe, model, is_adapter


def evaluate_saved(base: ModelSection, tuned: Path, section: EvalSection, out_dir: Path, *,
                   recipe: Recipe | None = None, final_note: str = "", method: str = "-") -> dict:
    """`finetune eval BASE RUN_OR_MODEL`: measure a saved model against its base, write the report to `out_dir`
    and return it. The tokenizer carries the run recipe's chat template, as in training."""
    fe, model, _ = open_saved(base, tuned, section, recipe.data.chat_template if recipe else None)
    tuned_eval = fe.evaluate(model, step=None)
    report = build_report(fe.base, tuned_eval, max_drop=section.max_drop, curve=[], provenance=provenance(recipe),
                          final_note=final_note or f"{tuned} as saved", method=method)
    write_report(out_dir, report)
    return report
