"""Two lm-eval runs written with `--log_samples`, a base model's and a tuned one's, read as finetune's records, so
that `finetune compare` gives them the same paired report as a finetune run. It reads lm-eval 0.4's layout: in the
model's folder under `--output_path`, `results_<date>.json` and one `samples_<task>_<date>.jsonl` per task, each
line one document with its `doc_id`, `doc_hash`, `prompt_hash`, filter and per-metric score. No torch and no lm_eval
here: it runs on a laptop beside results copied from a cluster.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .records import (
    PROMPT_CHARS,
    SUPPORTED_METRICS,
    Evaluation,
    TaskScore,
    chosen_option,
)

SAMPLE_KEYS = ("doc_id", "doc_hash", "prompt_hash", "filter", "metrics", "arguments", "filtered_resps", "target")


class LogError(UserError):
    """lm-eval output that cannot be compared as it is; the message names the file and the task."""


@dataclass
class LmEvalRun:
    """One lm-eval run: its results file, and the samples file of each task it logged."""

    results_file: Path
    results: dict
    samples: dict[str, Path]  # leaf task -> samples_<task>_<date>.jsonl
    docs: dict[str, dict[int, dict]] = field(default_factory=dict)  # leaf task -> doc_id -> {filter: line}, read once

    @property
    def model(self) -> str:
        args = (self.results.get("config") or {}).get("model_args")
        return str(self.results.get("model_name") or args or self.results_file.parent.name)


def find_run(path: Path) -> LmEvalRun:
    """The run in `path`: a results_<date>.json file, the model folder holding one, or lm-eval's --output_path
    holding one model folder."""
    if path.is_file():
        if not (path.name.startswith("results_") and path.suffix == ".json"):
            raise LogError(f"{path} is not an lm-eval results file (results_<date>.json); give the file or the "
                           "folder lm_eval --output_path wrote.")
        found = [path]
    elif path.is_dir():
        found = sorted(path.glob("results_*.json")) or sorted(path.glob("*/results_*.json"))
    else:
        raise LogError(f"{path} does not exist; give the folder lm_eval --output_path wrote, or a results_<date>.json "
                       "in it.")
    if not found:
        raise LogError(f"{path} holds no lm-eval results (results_<date>.json, in it or in a model folder below it). "
                       "Run lm_eval with --output_path and --log_samples.")
    if len(found) > 1:
        listed = ", ".join(str(p) for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise LogError(f"{path} holds {len(found)} lm-eval runs ({listed}); name one results file.")
    results_file = found[0]
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LogError(f"{results_file} cannot be read as JSON ({e}); was it copied whole?") from e
    if not isinstance(results, dict) or not isinstance(results.get("configs"), dict):
        raise LogError(f"{results_file} has no `configs`: not an lm-eval 0.4 results file.")
    date = results_file.stem[len("results_"):]
    samples = {task: results_file.parent / f"samples_{task}_{date}.jsonl" for task in results["configs"]}
    missing = [task for task, p in samples.items() if not p.is_file()]
    if missing:
        raise LogError(f"{results_file}: no per-example samples for {', '.join(missing)} (expected "
                       f"{samples[missing[0]].name} beside it). Run lm_eval with --log_samples.")
    return LmEvalRun(results_file, results, samples)


def _lines(run: LmEvalRun, leaf: str) -> dict[int, dict]:
    """doc_id -> {filter: the sample line}, read once and checked for the fields pairing needs."""
    if leaf not in run.docs:
        path, docs = run.samples[leaf], {}
        with path.open(encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError as e:
                    raise LogError(f"{path} line {number} is not JSON ({e.msg}); was the file cut short?") from e
                absent = [k for k in SAMPLE_KEYS if k not in line]
                if absent:
                    version = run.results.get("lm_eval_version", "unknown")
                    raise LogError(f"{path} line {number} has no {', '.join(absent)}: not the --log_samples layout "
                                   f"of lm-eval 0.4 that finetune reads (lm_eval_version in its results: "
                                   f"{version}).")
                docs.setdefault(int(line["doc_id"]), {})[line["filter"]] = line
        if not docs:
            raise LogError(f"{path} holds no samples.")
        run.docs[leaf] = docs
    return run.docs[leaf]


def _as_binary(value) -> float | None:
    """A per-example score as 0.0 or 1.0, or None where it is not one (BLEU's pairs, F1, perplexity...)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and float(value) in (0.0, 1.0):
        return float(value)
    return None


def _scored(run: LmEvalRun, leaf: str) -> list[tuple[str, str]]:
    """(metric, filter) pairs the results report for `leaf`, in their order."""
    keys = (run.results.get("results") or {}).get(leaf, {})
    return [tuple(k.split(",", 1)) for k in keys if "," in k and not k.split(",", 1)[0].endswith("_stderr")]


def _binary_everywhere(runs: list[LmEvalRun], leaf: str, metric: str, filter_: str) -> bool:
    return all(filter_ in d and _as_binary(d[filter_].get(metric)) is not None
               for run in runs for d in _lines(run, leaf).values())


def choose_metrics(runs: list[LmEvalRun], leaf: str) -> tuple[tuple[str, str], list[tuple[str, str]], list[str]]:
    """(headline (metric, filter), other 0/1 pairs, pairs left out because their per-example scores are not 0/1).
    The headline is the task's metadata.headline_metric if set, else the first of acc, acc_norm, exact_match it
    reports, else its first 0/1 metric: as finetune's own evaluation judges a task."""
    pairs = _scored(runs[0], leaf)
    binary = [p for p in pairs if _binary_everywhere(runs, leaf, *p)]
    skipped = [f"{m} ({f})" for m, f in pairs if (m, f) not in binary]
    chosen = ((runs[0].results["configs"][leaf].get("metadata") or {}).get("headline_metric"))
    ranked = ([p for p in binary if p[0] == chosen] if chosen else []) + \
        [p for name in SUPPORTED_METRICS for p in binary if p[0] == name] + binary
    if not ranked:
        raise LogError(f"task {leaf}: none of its metrics ({', '.join(skipped) or 'none'}) is 0 or 1 per example, "
                       "which finetune's paired tests need; leave it out with --tasks.")
    headline = ranked[0]
    return headline, [p for p in binary if p != headline], skipped


def check_paired(base: LmEvalRun, tuned: LmEvalRun, leaf: str) -> None:
    """Both runs scored the same documents with the same prompts (few-shot examples, template and instruction
    included), or the pairing would compare different questions: one line naming what differs."""
    for run in (base, tuned):
        if leaf not in run.samples:
            raise LogError(f"task {leaf}: {run.results_file} has no result for it; evaluate both models on the same "
                           "tasks.")
    a, b = _lines(base, leaf), _lines(tuned, leaf)
    if a.keys() != b.keys():
        raise LogError(f"task {leaf}: the base was scored on {len(a)} documents ({base.samples[leaf]}), the tuned "
                       f"model on {len(b)} ({tuned.samples[leaf]}), {len(a.keys() ^ b.keys())} of them not in both. "
                       "Evaluate both with the same --limit (or none).")
    first = {doc: next(iter(filters.values())) for doc, filters in a.items()}
    other = {doc: next(iter(filters.values())) for doc, filters in b.items()}
    docs = [d for d in sorted(a) if first[d]["doc_hash"] != other[d]["doc_hash"]]
    if docs:
        raise LogError(f"task {leaf}: {len(docs)} of {len(a)} documents differ between the two runs (doc_id "
                       f"{docs[0]} first): another dataset version or task config. Evaluate both on the same one.")
    prompts = [d for d in sorted(a) if first[d]["prompt_hash"] != other[d]["prompt_hash"]]
    if prompts:
        settings = {"num_fewshot": lambda r: (r.results.get("n-shot") or {}).get(leaf),
                    "fewshot_seed": lambda r: (r.results.get("config") or {}).get("fewshot_seed"),
                    "chat template": lambda r: r.results.get("chat_template_sha"),
                    "fewshot_as_multiturn": lambda r: r.results.get("fewshot_as_multiturn"),
                    "system instruction": lambda r: r.results.get("system_instruction_sha")}
        differ = [f"{name} {get(base)} vs {get(tuned)}" for name, get in settings.items() if get(base) != get(tuned)]
        why = f" ({'; '.join(differ)})" if differ else ""
        raise LogError(f"task {leaf}: the prompts differ on {len(prompts)} of {len(a)} documents (doc_id "
                       f"{prompts[0]} first){why}. A paired comparison needs the same prompts: evaluate both with "
                       "the same --num_fewshot, --fewshot_seed, chat template and system instruction.")


def _answers(run: LmEvalRun, leaf: str, line: dict, metric: str) -> tuple[str, str, int | None]:
    """(what the model answered, the right answer, number of options or None for generation)."""
    config = run.results["configs"][leaf]
    if config.get("output_type") != "multiple_choice":
        reply = line["filtered_resps"]
        return str(reply[0] if isinstance(reply, list) and reply else reply), str(line["target"]), None
    options = [args["arg_1"] for args in line["arguments"].values()]
    delimiter = config.get("target_delimiter", " ")
    choices = [o[len(delimiter):] if isinstance(o, str) and o.startswith(delimiter) else str(o) for o in options]
    lls = [float(r[0]) for r in line["filtered_resps"]][:len(choices)]
    target = str(line["target"])  # the log keeps the right option's index as text
    return *chosen_option(choices, lls, int(target) if target.isdigit() else target, metric), len(choices)


def task_score(run: LmEvalRun, name: str, leaves: list[str], headline: dict[str, tuple[str, str]],
               others: dict[str, list[tuple[str, str]]]) -> TaskScore:
    """One task (or a group: its leaves pooled, as finetune scores a group) as a TaskScore keyed `leaf/doc_id`."""
    metric = headline[leaves[0]][0]
    score = TaskScore(task=name, metric=metric, value=0.0, examples={}, others={})
    options = []
    for leaf in leaves:
        metric_here, filter_ = headline[leaf]
        for doc, filters in sorted(_lines(run, leaf).items()):
            key, line = f"{leaf}/{doc}", filters[filter_]
            score.examples[key] = _as_binary(line[metric_here])
            for m, f in others[leaf]:
                label = m if f == filter_ else f"{m} ({f})"
                score.others.setdefault(label, {})[key] = _as_binary(filters[f][m])
            score.answers[key], score.expected[key], n = _answers(run, leaf, line, metric_here)
            options.append(n)
            prompt = line["arguments"].get("gen_args_0", {}).get("arg_0", "")
            score.prompts[key] = str(prompt)[-PROMPT_CHARS:]
    score.value = sum(score.examples.values()) / len(score.examples)
    counts = run.results.get("n-samples") or {}
    score.available = sum((counts.get(leaf) or {}).get("original", 0) for leaf in leaves) or None
    score.chance = sum(1 / n for n in options) / len(options) if all(options) else None
    return score


def leaves_of(run: LmEvalRun, task: str) -> list[str]:
    """A task's leaf tasks: itself, or a group's subtasks (recursively), as the results' group_subtasks list them."""
    groups = run.results.get("group_subtasks") or {}
    if task in run.results["configs"] and not groups.get(task):
        return [task]
    if task not in groups:
        known = ", ".join(top_level(run))
        raise LogError(f"task {task} is not in {run.results_file} (it has {known}).")
    return [leaf for sub in groups[task] for leaf in leaves_of(run, sub)]


def top_level(run: LmEvalRun) -> list[str]:
    """The tasks as the user asked lm-eval for them: groups that are in no other group, and tasks in no group."""
    groups = run.results.get("group_subtasks") or {}
    inner = {sub for subs in groups.values() for sub in subs}
    named = [g for g in groups if g not in inner and groups[g]]
    return named + [t for t in run.results["configs"] if t not in inner and t not in named]


def unpaired_z(base: LmEvalRun, tuned: LmEvalRun, leaf: str, metric: str, filter_: str) -> dict | None:
    """lm-eval's own comparison of two runs (scripts/model_comparator.py): a z-test on the two aggregate scores and
    their standard errors, as if the examples were unrelated. Shown beside the paired result, for reference."""
    def get(run, key):
        return (run.results.get("results") or {}).get(leaf, {}).get(f"{key},{filter_}")

    a, b, sa, sb = get(base, metric), get(tuned, metric), get(base, f"{metric}_stderr"), get(tuned, f"{metric}_stderr")
    if not all(isinstance(x, (int, float)) for x in (a, b, sa, sb)) or sa ** 2 + sb ** 2 == 0:
        return None
    z = (b - a) / math.sqrt(sa ** 2 + sb ** 2)
    return {"base": a, "tuned": b, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


@dataclass
class Compared:
    base: Evaluation
    tuned: Evaluation
    not_compared: list[str]  # "task: metric (filter)" whose per-example scores are not 0/1
    unpaired: dict[str, dict]  # task -> lm-eval's unpaired z-test, where the results give standard errors


def read_pair(base: LmEvalRun, tuned: LmEvalRun, tasks: list[str] | None, target_tasks: list[str] | None) -> Compared:
    """The two runs as finetune's Evaluations of the same examples: original tasks (all the base's top-level tasks
    but the targets, unless `tasks` names them) and target tasks."""
    targets = list(target_tasks or [])
    originals = list(tasks) if tasks else [t for t in top_level(base) if t not in targets]
    both = [t for t in originals if t in targets]
    if both:
        raise LogError(f"{', '.join(both)} is named both in --tasks and in --target-tasks; a task is either one the "
                       "model must keep or the new skill.")
    if not originals and not targets:
        raise LogError(f"no tasks to compare: {base.results_file} lists none but the target tasks.")
    evaluations = {"base": Evaluation(step=0, tasks={}), "tuned": Evaluation(step=None, tasks={})}
    not_compared, unpaired = [], {}
    for kind, names in (("tasks", originals), ("targets", targets)):
        for name in names:
            leaves = leaves_of(base, name)
            headline, others = {}, {}
            for leaf in leaves:
                check_paired(base, tuned, leaf)
                headline[leaf], others[leaf], skipped = choose_metrics([base, tuned], leaf)
                not_compared += [f"{leaf}: {s}" for s in skipped]
            if len({m for m, _ in headline.values()}) > 1:
                raise LogError(f"group {name}: its tasks are judged by different metrics "
                               f"({', '.join(sorted({m for m, _ in headline.values()}))}); name them one by one "
                               "with --tasks.")
            for side, run in (("base", base), ("tuned", tuned)):
                getattr(evaluations[side], kind)[name] = task_score(run, name, leaves, headline, others)
            if len(leaves) == 1 and (z := unpaired_z(base, tuned, leaves[0], *headline[leaves[0]])):
                unpaired[name] = z
    return Compared(evaluations["base"], evaluations["tuned"], not_compared, unpaired)


def compare_logs(base_path: Path, tuned_path: Path, *, max_drop: float, tasks: list[str] | None,
                 target_tasks: list[str] | None, out: Path | None) -> tuple[dict, Path, Compared]:
    """`finetune compare BASE TUNED`: the paired report of two lm-eval runs, written to `out` (which must not hold
    files yet), else to ./forgetting-lm-eval or its next free sibling. Returns (report, the folder, what was read)."""
    from ..files import report_dir
    from .report import UNNAMED, build_report, provenance, write_report

    base, tuned = find_run(base_path), find_run(tuned_path)
    if base.results_file.resolve() == tuned.results_file.resolve():
        raise LogError(f"{base_path} and {tuned_path} are the same lm-eval run ({base.results_file}).")
    compared = read_pair(base, tuned, tasks, target_tasks)
    chosen = report_dir(out, Path("forgetting-lm-eval"))
    made = provenance()
    made["lm_eval"] = {side: {"model": run.model, "results": str(run.results_file.resolve()),
                              "lm_eval_version": run.results.get("lm_eval_version")}
                       for side, run in (("base", base), ("tuned", tuned))}
    made["lm_eval"]["not_compared"] = compared.not_compared
    report = build_report(compared.base, compared.tuned, max_drop=max_drop, curve=[], provenance=made,
                          final_note=f"{tuned.model} as lm-eval scored it ({tuned.results_file})",
                          method={**UNNAMED, "label": f"lm-eval: {tuned.model} against {base.model}"},
                          settings=("--max-drop", "lm_eval --limit"))
    report["unpaired"] = compared.unpaired
    write_report(chosen, report)
    return report, chosen, compared
