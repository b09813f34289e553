"""finetune's evaluations saved in lm-eval's --log_samples layout, by lm-eval's own writer, beside report.json:
`forgetting/lm-eval/base/` and `forgetting/lm-eval/tuned/`, each a results_<date>.json and one
samples_<task>_<date>.jsonl per task. `finetune compare` reads them back like any lm-eval run's
(reports/lm_eval_logs.py), so a finetune evaluation can be compared with one lm-eval ran elsewhere, and other tools
can read ours.
"""

from __future__ import annotations

import copy
import shutil
from importlib.metadata import version
from pathlib import Path

from ..reports.records import Evaluation
from .tasks import LOGGED


def write_lm_eval_logs(folder: Path, evaluations: dict[str, Evaluation], models: dict[str, str], *,
                       chat: bool, limit: int | None) -> list[str]:
    """lm-eval's layout under `folder`, one subfolder per side ("base", "tuned") of `evaluations`, the model named as
    in `models`; what an earlier report left there is replaced, as report.json is. Returns a note for each side that
    could not be saved: its samples were not kept (a curve point read back from curve.jsonl after a resume), or
    lm-eval's writer failed (it logs a warning and carries on)."""
    from lm_eval.loggers import EvaluationTracker

    notes = []
    for side, evaluation in evaluations.items():
        scores = [*evaluation.tasks.values(), *evaluation.targets.values()]
        if not scores:
            continue
        if not all(score.log for score in scores):
            notes.append(f"the {side} model's per-example samples were not kept (measured before a resume); "
                         f"{folder / side} is not written")
            continue
        logs = {leaf: part for score in scores for leaf, part in score.log.items()}
        results = {key: {leaf: part[key] for leaf, part in logs.items()} for key in LOGGED}
        # A group lists its tasks; a task alone lists none, as lm-eval's own results do.
        results["group_subtasks"] = {score.task: sorted(score.log) if len(score.log) > 1 else [] for score in scores}
        results["config"] = {"model": "finetune", "model_args": models[side], "limit": limit}
        results["lm_eval_version"] = version("lm_eval")
        shutil.rmtree(folder / side, ignore_errors=True)
        tracker = EvaluationTracker(output_path=str(folder))
        general = tracker.general_config_tracker
        general.model_source, general.model_name, general.model_name_sanitized = "finetune", models[side], side
        general.fewshot_as_multiturn = chat
        samples = {leaf: copy.deepcopy(part["samples"]) for leaf, part in logs.items()}  # the writer edits them
        tracker.save_results_aggregated(results=results, samples=samples)
        for leaf, rows in samples.items():
            tracker.save_results_samples(task_name=leaf, samples=rows)
        written = list((folder / side).glob("results_*.json")) + list((folder / side).glob("samples_*.jsonl"))
        if len(written) != 1 + len(samples):
            notes.append(f"lm-eval could not write the {side} model's samples to {folder / side} (its log says why)")
    return notes
