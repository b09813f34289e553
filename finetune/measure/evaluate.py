"""Original-task evaluation: lm-evaluation-harness on in-memory models, the base model's results cached, and the
measurements a run makes (the base before training, the tuned model after, optionally every `eval.every` updates).

In a launch of several processes the ranks share the work: each measures with a whole model of its own (the
unwrapped model under DDP, a gathered copy under FSDP and DeepSpeed: gather.whole_model) its share of every task's
documents and of the drift texts (sharing.py), and every rank gets all the results, the same as one process's
example by example. The main process alone reads and writes the base-result cache and the curve file. Scoring is
lm-eval's; this module picks each task's headline metric (`headline_metric`), keeps every supported metric's
per-example scores keyed by document (so base and tuned are compared example by example), the chance level, and
what the model answered, so a report can show what was forgotten.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import logging
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_text, final_folder, read_jsonl
from .drift import NEW_TOKENS, PROMPTS, SAMPLING_SEED, AdapterDisabled, eval_mode, kl_drift, read_texts, sample_chat, \
    sample_texts
from ..errors import UpstreamChanged, UserError
from ..model import load_model, load_tokenizer, resolve_model_path
from ..quiet import silence_lm_eval
from ..recipe import EvalSection, ModelSection, Recipe
from ..reports.records import Evaluation, TaskScore, from_dict, to_dict
from ..reports.report import build_report, provenance, write_report
from .sharing import Ranks, as_one_process, shared_lm_class

# Metrics whose per-example scores are 0 or 1, as the paired statistics need (forgetting.py).
SUPPORTED_METRICS = ("acc", "acc_norm", "exact_match")
PROMPT_CHARS = 400  # of each example's question kept for the report (the end, where the question is)


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
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as e:
        raise UpstreamChanged("lm_eval", "lm_eval.tasks._yaml_loader.load_yaml") from e

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
                     chat: bool = False, ranks: Ranks = Ranks()):
    """One lm-eval pass over every spec's tasks (its set-up costs seconds, so one call, not one per task). With
    several `ranks`, each scores the requests of its share of the documents and every rank gets all the scores."""
    import lm_eval

    silence_lm_eval()
    if not loaded:
        return {}  # no tasks: the drift alone measures forgetting
    leaves = [task for _, tasks in loaded.values() for task in tasks.values()]
    with eval_mode(model), _quiet(logging.getLogger("lm_eval.models.huggingface")), as_one_process():
        lm = shared_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, ranks=ranks)
        # Tasks go in as objects, with an empty index: lm-eval would otherwise re-scan its 15k configs per call.
        # Its bootstrap standard errors are skipped: the report's intervals are paired, over the same examples.
        # With `chat`, prompts go through the tokenizer's chat template (few-shot examples as earlier turns), as
        # an instruct model is prompted and as chat-format training data is rendered.
        out = lm_eval.simple_evaluate(lm, tasks=leaves, task_manager=_folder_tasks(None), limit=limit,
                                      log_samples=True, bootstrap_iters=0, apply_chat_template=chat,
                                      fewshot_as_multiturn=chat)
    return {spec: _score(name, tasks, out) for spec, (name, tasks) in loaded.items()}


def headline_metric(task, reported: set[str]) -> str:
    """The metric a task is judged by: `metadata: {headline_metric: ...}` in its YAML if set, else the first of
    acc, acc_norm and exact_match in the order its `metric_list` gives them. Users of multiple-choice suites expect
    plain accuracy unless told otherwise: acc_norm divides each option's log-likelihood by its length in characters,
    which on one- or two-character answers ("5", "10") picks by length more than by content."""
    chosen = (task.config.metadata or {}).get("headline_metric")
    listed = [m["metric"] for m in task.config.metric_list or [] if isinstance(m.get("metric"), str)]
    name = task.config.task
    if chosen is not None:
        if chosen not in SUPPORTED_METRICS or chosen not in reported:
            raise EvalError(f"task {name}: metadata.headline_metric is {chosen!r}; it must be one of the metrics "
                            f"the task reports among {', '.join(SUPPORTED_METRICS)} ({sorted(reported)}).")
        return chosen
    metric = next((m for m in [*listed, *SUPPORTED_METRICS] if m in SUPPORTED_METRICS and m in reported), None)
    if metric is None:
        raise EvalError(f"task {name} reports {sorted(reported)}; forgetting is measured on one of "
                        f"{', '.join(SUPPORTED_METRICS)} (per-example scores of 0 or 1).")
    return metric


def _chosen_option(task, sample: dict, metric: str) -> tuple[str, str]:
    """(what the model answered, the right answer) for one multiple-choice sample, as lm-eval scored `metric`."""
    choices = task.doc_to_choice(sample["doc"])
    lls = [resp[0] for resp in sample["filtered_resps"]][:len(choices)]
    if metric == "acc_norm":  # lm-eval's normalisation: the log-likelihood per character of the option
        lls = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    pick = max(range(len(lls)), key=lambda i: lls[i])
    gold = sample["target"]
    gold = gold[0] if isinstance(gold, list) else gold
    expected = choices[gold] if isinstance(gold, int) and 0 <= gold < len(choices) else str(gold)
    return choices[pick], expected


def _score(name: str, tasks: dict, out: dict) -> TaskScore:
    leaves = sorted(tasks)
    # Results are keyed "metric,filter". A task with several filters (e.g. strict and flexible answer
    # extraction) reports each metric once per filter: the first listed is taken, as in lm-eval's own tables.
    reported = [key.split(",", 1) for key in out["results"][leaves[0]] if "," in key]
    first = tasks[leaves[0]]
    metric = headline_metric(first, {m for m, _ in reported if not m.endswith("_stderr")})
    filter_name = next(f for m, f in reported if m == metric)
    others = [m for m in SUPPORTED_METRICS if m != metric and [m, filter_name] in reported]
    score = TaskScore(task=name, metric=metric, value=0.0, examples={}, others={m: {} for m in others},
                      available=sum(len(tasks[leaf].eval_docs) for leaf in leaves))
    options = []
    for leaf in leaves:
        task = tasks[leaf]
        for sample in sorted(out["samples"][leaf], key=lambda s: s["doc_id"]):
            if sample["filter"] != filter_name:
                continue
            key = f"{leaf}/{sample['doc_id']}"
            score.examples[key] = float(sample[metric])
            for m in others:
                score.others[m][key] = float(sample[m])
            if task.OUTPUT_TYPE == "multiple_choice":
                options.append(len(task.doc_to_choice(sample["doc"])))
                score.answers[key], score.expected[key] = _chosen_option(task, sample, metric)
            else:
                score.answers[key] = str(sample["filtered_resps"][0])
                score.expected[key] = str(sample["target"])
            score.prompts[key] = str(task.doc_to_text(sample["doc"]))[-PROMPT_CHARS:]
    # One task: lm-eval's aggregate. A group: the mean over all its examples (lm-eval's group mean may weight
    # its tasks equally instead, which the per-example pairing could not reproduce).
    score.value = float(out["results"][leaves[0]][f"{metric},{filter_name}"]) if len(leaves) == 1 else \
        sum(score.examples.values()) / len(score.examples)
    score.chance = sum(1 / k for k in options) / len(options) if options and len(options) == len(score.examples) \
        else None
    return score


@_preserved_rng()
def evaluate_tasks(model, tokenizer, tasks: list[str], *, batch_size: int, limit: int | None,
                   chat: bool = False, ranks: Ranks = Ranks()) -> dict[str, TaskScore]:
    """{spec: TaskScore} for lm-eval task names or task YAML files, scored by lm-eval on an in-memory model (a whole
    copy on each of `ranks`, which share the work)."""
    loaded = {spec: load_tasks(spec) for spec in tasks}
    return _evaluate_loaded(model, tokenizer, loaded, batch_size=batch_size, limit=limit, chat=chat, ranks=ranks)


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
    identity = {"path": str(Path(path).resolve()), "files": files, "dtype": section.dtype}
    if section.quantization is not None:  # a 4-bit base scores differently; unquantized keys stay as they were
        identity["quantization"] = dataclasses.asdict(section.quantization)
    return identity


def tokenizer_identity(tokenizer) -> str:
    """A hash of the tokenizer actually used: its vocabulary and rules, special tokens and chat template (a recipe's
    `data.chat_template` replaces the model's, and changes every prompt under apply_chat_template)."""
    if hasattr(tokenizer, "backend_tokenizer"):
        # Without its padding and truncation state, which every padded call changes and which scores do not see.
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        backend = json.dumps({k: v for k, v in state.items() if k not in ("padding", "truncation")}, sort_keys=True)
    else:
        backend = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [backend, tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens_map, sort_keys=True,
                                                                default=str)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _stable(value) -> str:
    """A JSON stand-in for what task configs hold besides data: for a function (a custom loader, a `!function`
    filter or prompt), its source code, so an edit to it changes the fingerprint; never its address."""
    try:
        return hashlib.sha256(inspect.getsource(value).encode()).hexdigest()
    except (OSError, TypeError):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"


def task_fingerprint(tasks: dict, limit: int | None) -> str:
    """A hash of what decides a task's score besides the model: every leaf task's config (functions by their
    source), the documents evaluated and the few-shot documents (content, not file names: a data file edited in
    place gets a new fingerprint)."""
    digest = hashlib.sha256()
    for name in sorted(tasks):
        task = tasks[name]
        docs = task.eval_docs
        n = len(docs) if limit is None else min(limit, len(docs))
        digest.update(json.dumps([name, task.dump_config()], sort_keys=True, default=_stable).encode())
        for i in range(n):
            digest.update(json.dumps(docs[i], sort_keys=True, default=str).encode())
        for doc in (task.fewshot_docs() or []) if task.config.num_fewshot else []:
            digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
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
    """Forgetting of one run, measured against its base model. The calls, in order:

        fe = ForgettingEval(recipe.eval, recipe.model, tokenizer, curve_file=run/"forgetting"/"curve.jsonl",
                            resumed_step=progress["step"], ranks=Ranks.of(accelerator))
        fe.evaluate_base(model)          # before training; cached across runs of the same base, tasks and settings
        fe.evaluate(model, step)         # every eval.every updates, and after the last: appended to fe.curve

    `model` is a whole model holding the weights to measure (the unwrapped model being trained, or a whole copy of
    it). A peft model is its own base with the adapter switched off; for full fine-tuning the base is loaded again
    from model.path for the drift, then freed. With several `ranks` every call is collective: each rank scores its
    share of the documents and drift texts with its own whole model, every rank ends with the same results, and the
    main process alone reads and writes the cache and the curve file.
    """

    def __init__(self, section: EvalSection, model_section: ModelSection, tokenizer, *,
                 curve_file: Path | None = None, resumed_step: int = 0, ranks: Ranks = Ranks()):
        both = set(section.tasks) & set(section.target_tasks)
        if both:
            raise EvalError(f"{sorted(both)} are listed in both eval.tasks and eval.target_tasks; a task measures "
                            "either what must not be forgotten or what is learned.")
        self.section, self.model_section, self.tokenizer = section, model_section, tokenizer
        self.cache_dir = Path(model_section.cache_dir).expanduser()
        # The base's scores are cached under what decides them: the weights, and the tokenizer and chat template used.
        self.identity = {**model_identity(model_section), "tokenizer": tokenizer_identity(tokenizer)}
        # By kind: "text" (the user's files, or sampled from the base in evaluate_base) and, for a tokenizer with a
        # chat template, "chat" (the base's replies in that template, sampled in evaluate_base).
        self.texts: dict[str, list] = {"text": read_texts(section.drift_texts)} if section.drift_texts else {}
        self.base: Evaluation | None = None
        self.ranks = ranks
        self.curve_file = curve_file if ranks.main else None
        self.curve: list[Evaluation] = []  # every tuned evaluation, in step order
        if self.curve_file is not None and curve_file.is_file():
            # Points past the checkpoint we resume from describe updates that are about to be redone.
            points = [from_dict(Evaluation, d) for d in read_jsonl(curve_file)]
            self.curve = [e for e in points if e.step <= resumed_step]
            atomic_write_text(curve_file, "".join(json.dumps(to_dict(e)) + "\n" for e in self.curve))
        self.curve = ranks.from_main(self.curve)

    def _cache_path(self, kind: str, *parts) -> Path:
        key = hashlib.sha256(json.dumps([self.identity, *parts], sort_keys=True, default=str).encode())
        return self.cache_dir / kind / f"{key.hexdigest()[:20]}.json"

    @_preserved_rng()
    def evaluate_base(self, model=None) -> Evaluation:
        """The base model's scores, and the drift texts it samples; each from the cache under
        <model.cache_dir> when this base was measured the same way before. `model` holds the base weights (the
        model about to be trained; a peft model's adapter is switched off), or None to load them when needed."""
        specs = self.section.tasks + self.section.target_tasks
        settings = {"lm_eval": version("lm_eval"), "limit": self.section.limit, "batch_size": self.section.batch_size,
                    "chat": self.section.apply_chat_template}
        loaded = {spec: load_tasks(spec) for spec in specs}
        kinds = {"text": sample_texts, **({"chat": sample_chat} if self.tokenizer.chat_template else {})}
        # The main process alone reads the cache and decides what is missing, so that every rank takes the same
        # branch below (on several machines, each would read its own disk).
        scores, missing, texts_paths, to_sample = {}, [], {}, []
        if self.ranks.main:
            paths = {spec: self._cache_path("base_eval", settings, task_fingerprint(tasks, self.section.limit))
                     for spec, (_, tasks) in loaded.items()}
            scores = {spec: from_dict(TaskScore, _read_json(path)) for spec, path in paths.items() if path.is_file()}
            missing = [spec for spec in specs if spec not in scores]
            texts_paths = {kind: self._cache_path("drift", kind, PROMPTS[kind], NEW_TOKENS, SAMPLING_SEED)
                           for kind in kinds if kind not in self.texts}
            to_sample = [kind for kind, path in texts_paths.items() if not path.is_file()]
            print(f"measuring the base model on {len(missing)} task(s) (once; cached for later runs)" if missing else
                  f"the base model's scores: from the cache ({self.cache_dir})", file=sys.stderr)
        missing, to_sample = self.ranks.from_main((missing, to_sample))
        if missing or to_sample:
            with self._plain_base(model) as base:
                if missing:
                    fresh = _evaluate_loaded(base, self.tokenizer, {spec: loaded[spec] for spec in missing},
                                             batch_size=self.section.batch_size, limit=self.section.limit,
                                             chat=self.section.apply_chat_template, ranks=self.ranks)
                    for spec, score in fresh.items():
                        if self.ranks.main:
                            _write_json(paths[spec], to_dict(score))
                        scores[spec] = score
                # Sampled by one process: one seeded stream over the prompts, as the cached texts were drawn.
                if self.ranks.main:
                    if to_sample:
                        print(f"the base model writes its drift texts ({' and '.join(to_sample)}, "
                              f"{sum(len(PROMPTS[k]) for k in to_sample)} in all; once, then cached)", file=sys.stderr)
                    for kind in to_sample:
                        _write_json(texts_paths[kind], kinds[kind](base, self.tokenizer, PROMPTS[kind],
                                                                   new_tokens=NEW_TOKENS, seed=SAMPLING_SEED))
        for kind, path in texts_paths.items():
            self.texts[kind] = _read_json(path)
        scores, self.texts = self.ranks.from_main((scores, self.texts))
        self.base = Evaluation(step=0, tasks={s: scores[s] for s in self.section.tasks},
                               targets={s: scores[s] for s in self.section.target_tasks})
        return self.base

    @_preserved_rng()
    def evaluate(self, model, step: int | None) -> Evaluation:
        """Scores and drift of the model after `step` updates; appended to `curve` (and, by the main process, to the
        curve file)."""
        if self.base is None:
            raise RuntimeError("evaluate_base() must run first: the drift is measured on the base's texts")
        if self.ranks.main:
            print(f"measuring the {'tuned' if step is None else f'step-{step}'} model on "
                  f"{len(self.section.tasks) + len(self.section.target_tasks)} task(s), and its drift from the base",
                  file=sys.stderr)
        scores = evaluate_tasks(model, self.tokenizer, self.section.tasks + self.section.target_tasks,
                                batch_size=self.section.batch_size, limit=self.section.limit,
                                chat=self.section.apply_chat_template, ranks=self.ranks)
        base = self._base_beside(model)
        # Chat texts are rendered by the template, special tokens included; raw texts get the tokenizer's own.
        drift = {kind: kl_drift(base, model, self.tokenizer, texts, max_length=self.section.drift_max_length,
                                special_tokens=kind != "chat", ranks=self.ranks) for kind, texts in self.texts.items()}
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

    folder = final_folder(folder)
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
                   recipe: Recipe | None = None, final_note: str = "", method: dict | None = None) -> dict:
    """`finetune eval BASE RUN_OR_MODEL`: measure a saved model against its base, write the report to `out_dir`
    and return it. The tokenizer carries the run recipe's chat template, as in training."""
    fe, model, _ = open_saved(base, tuned, section, recipe.data.chat_template if recipe else None)
    tuned_eval = fe.evaluate(model, step=None)
    report = build_report(fe.base, tuned_eval, max_drop=section.max_drop, curve=[], provenance=provenance(recipe),
                          final_note=final_note or f"{tuned} as saved", method=method)
    write_report(out_dir, report)
    return report


def _load_checkpoint_weights(model, checkpoint: Path) -> None:
    """A checkpoint's weights (the adapter, for LoRA) into `model`, built as the run built it. Weights tied to
    others (the LM head to the embeddings) may be saved once."""
    from safetensors.torch import load_file

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise EvalError(f"{checkpoint} holds no model.safetensors (a sharded FSDP or DeepSpeed checkpoint?); only "
                        "checkpoints of one-process and DDP runs can be evaluated one by one.")
    state = load_file(path, device=str(eval_device()))
    result = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters())
    untied = [k for k in result.missing_keys if k in params and params[k].requires_grad
              and params[k].data_ptr() not in loaded]
    if result.unexpected_keys or untied:
        raise EvalError(f"{checkpoint} does not match the run's model (missing {untied[:3]}, unexpected "
                        f"{result.unexpected_keys[:3]}).")


def evaluate_checkpoints(run: Path, recipe: Recipe, section: EvalSection, out_dir: Path, *, method: dict) -> dict:
    """`finetune eval BASE RUN --checkpoints`: every checkpoint a finished run kept, then its final/, as the curve
    that `eval.every` would have drawn during training, without training again. Writes the report to `out_dir`."""
    from ..checkpoint import checkpoint_step, complete_checkpoints

    if not (run / "final").is_dir():
        raise EvalError(f"{run} has no final/: --checkpoints measures a finished run.")
    fe = ForgettingEval(section, recipe.model, load_tokenizer(recipe.model, recipe.data.chat_template))
    model = load_model(recipe.model, recipe.lora).to(eval_device())  # a fresh adapter is the base (B = 0)
    fe.evaluate_base(model if recipe.lora else None)
    for checkpoint in complete_checkpoints(run / "checkpoints"):
        _load_checkpoint_weights(model, checkpoint)
        fe.evaluate(model, checkpoint_step(checkpoint))
    del model
    final, _ = load_tuned(recipe.model, run)
    logged = read_jsonl(run / "metrics.jsonl")
    last = fe.evaluate(final, logged[-1]["step"] if logged else None)
    report = build_report(fe.base, last, max_drop=section.max_drop, curve=fe.curve, provenance=provenance(recipe),
                          final_note=f"{run / 'final'}, after step {last.step}; the curve adds every checkpoint "
                                     "the run kept", method=method)
    write_report(out_dir, report)
    return report
