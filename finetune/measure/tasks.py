"""The lm-evaluation-harness adapter: tasks by name or local YAML file, scored on an in-memory model. Scoring is
lm-eval's; this module picks each task's headline metric (`headline_metric`), keeps every supported metric's
per-example scores keyed by document (so base and tuned are compared example by example), the chance level, and
what the model answered, so a report can show what was forgotten.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from ..errors import UpstreamChanged, UserError
from ..model import eval_mode
from ..quiet import silence_lm_eval
from ..reports.records import PROMPT_CHARS, SUPPORTED_METRICS, TaskScore, chosen_option
from .sharing import Ranks, as_one_process, shared_lm_class


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
def preserved_rng() -> Iterator[None]:
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


@contextmanager
def _without_machine_survey() -> Iterator[None]:
    """lm-eval's simple_evaluate describes the machine with torch.utils.collect_env, which runs `pip list --format=
    freeze`, lscpu and more in subprocesses: 0.47 s of every evaluation here (2 cores; more in a large environment),
    98 `pip list` runs in one pass of the test suite, for a field (`pretty_env_info`) that no report of finetune reads.
    The versions it records are kept. Where a release no longer has `add_env_info` (tests/test_contracts.py pins it),
    lm-eval's own runs as before."""
    from lm_eval import evaluator

    survey = getattr(evaluator, "add_env_info", None)

    def versions_only(storage: dict) -> None:
        storage.update({"pretty_env_info": "not collected (finetune skips torch.utils.collect_env)",
                        "transformers_version": version("transformers"), "lm_eval_version": version("lm_eval"),
                        "upper_git_hash": None})

    if survey is not None:
        evaluator.add_env_info = versions_only
    try:
        yield
    finally:
        if survey is not None:
            evaluator.add_env_info = survey


def evaluate_loaded(model, tokenizer, loaded: dict[str, dict], *, batch_size: int, limit: int | None,
                     chat: bool = False, share_prefixes: bool = False, ranks: Ranks = Ranks(), autocast=None):
    """One lm-eval pass over every spec's tasks (its set-up costs seconds, so one call, not one per task). With
    several `ranks`, each scores the requests of its share of the documents and every rank gets all the scores.
    `autocast`: a dtype for lm-eval's own autocast of every forward pass (its `mixed_precision_dtype`), or None."""
    if not loaded:
        return {}  # no tasks: the drift alone measures forgetting
    silence_lm_eval()
    with eval_mode(model), _quiet(logging.getLogger("lm_eval.models.huggingface")), as_one_process():
        lm = shared_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, ranks=ranks,
                               share_prefixes=share_prefixes, mixed_precision_dtype=autocast)
        return evaluate_with(lm, loaded, limit=limit, chat=chat)


@functools.cache
def _compile_templates_once() -> None:
    """lm-eval compiles a task's Jinja templates (doc_to_text, doc_to_choice, ...) again for every document, with
    `Environment.from_string`, which skips Jinja's own cache: 1.3 s of a 420-question multiple-choice task on 2 CPU
    cores. Its `apply_template` here keeps each compiled template; rendering is unchanged."""
    from lm_eval import utils

    if not hasattr(utils, "env") or not hasattr(utils, "apply_template"):
        return  # another lm-eval: its own way (tests/test_contracts.py says when this happens)
    compiled = functools.lru_cache(maxsize=1024)(lambda template: utils.env.from_string(template))
    utils.apply_template = lambda template, doc: compiled(template).render(**doc)


def evaluate_with(lm, loaded: dict[str, dict], *, limit: int | None, chat: bool) -> dict:
    """{spec: TaskScore} for the `loaded` tasks scored by lm-eval's model `lm` (finetune's in-memory HFLM, or
    lm-eval's own vLLM model)."""
    import lm_eval

    silence_lm_eval()
    _compile_templates_once()
    leaves = [task for _, tasks in loaded.values() for task in tasks.values()]
    with _without_machine_survey():
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
    return chosen_option(choices, lls, sample["target"], metric)


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
    score.log = _lm_eval_log(leaves, out)
    # One task: lm-eval's aggregate. A group: the mean over all its examples (lm-eval's group mean may weight
    # its tasks equally instead, which the per-example pairing could not reproduce).
    score.value = float(out["results"][leaves[0]][f"{metric},{filter_name}"]) if len(leaves) == 1 else \
        sum(score.examples.values()) / len(score.examples)
    score.chance = sum(1 / k for k in options) / len(options) if options and len(options) == len(score.examples) \
        else None
    return score


LOGGED = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _lm_eval_log(leaves: list[str], out: dict) -> dict[str, dict]:
    """Each leaf's part of lm-eval's output as its --log_samples would save it (lm_eval_samples.py writes it with
    lm-eval's own writer), through JSON as lm-eval serialises it."""
    from lm_eval.utils import handle_non_serializable

    # In document order: under several ranks lm-eval gathers each rank's share in turn.
    kept = {leaf: {"samples": sorted(out["samples"][leaf], key=lambda s: (s["doc_id"], s["filter"])),
                   **{key: out[key].get(leaf) for key in LOGGED}} for leaf in leaves}
    return json.loads(json.dumps(kept, default=handle_non_serializable, ensure_ascii=False))


@preserved_rng()
def evaluate_tasks(model, tokenizer, tasks: list[str], *, batch_size: int, limit: int | None,
                   chat: bool = False, share_prefixes: bool = False, ranks: Ranks = Ranks(),
                   autocast=None) -> dict[str, TaskScore]:
    """{spec: TaskScore} for lm-eval task names or task YAML files, scored by lm-eval on an in-memory model (a whole
    copy on each of `ranks`, which share the work)."""
    loaded = {spec: load_tasks(spec) for spec in tasks}
    return evaluate_loaded(model, tokenizer, loaded, batch_size=batch_size, limit=limit, chat=chat,
                           share_prefixes=share_prefixes, ranks=ranks, autocast=autocast)
