"""A sweep's pruning (`finetune sweep --prune`): the sweep's runs as the trials of an Optuna study, and what a run
of that study reports to it.

The study lives in the sweep's folder (study.journal, Optuna's journal storage: a file that several processes, and
machines sharing the folder, may use at once), or in any storage Optuna takes (`--storage`, e.g. an RDB URL for
SLURM array tasks). Each run is a trial, queued in the grid's order; the run reports its forecast's odds of FAIL
(reports/forecast.py, the odds its calibration runs can vouch for) when it makes the forecast, and Optuna's pruner
decides. A pruned run stops there and is measured there, so its partial result stays on the sweep's plane, marked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError
from .reports.forecast import BEYOND_DOUBT

ENV = "FINETUNE_SWEEP_TRIAL"  # how the sweep tells a run which study and trial it is: {"storage", "study", "trial"}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("`finetune sweep --prune` runs the grid as an Optuna study, and Optuna is not installed: "
                        "pip install 'finetune[sweep]' (or optuna).") from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines would interleave with the runs'
    return optuna


def storage(where: str | Path):
    """An Optuna storage: a URL as it is (sqlite:///..., postgresql://...), else a journal file at that path."""
    optuna = _optuna()
    if "://" in str(where):
        return str(where)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(where)))


def pruner(odds: float = BEYOND_DOUBT):
    """Optuna's pruner for the forecast: prunes a trial whose last reported odds of FAIL reach `odds`. Optuna's own
    ThresholdPruner prunes only above its bound, and `beyond doubt` is at or above it."""
    optuna = _optuna()

    class ForecastPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            step = trial.last_step
            return step is not None and trial.intermediate_values[step] >= odds

    return ForecastPruner()


def open_study(where: str | Path, name: str):
    """The sweep's study, made on first use and loaded after (by a rerun, or by another worker)."""
    return _optuna().create_study(study_name=name, storage=storage(where), load_if_exists=True,
                                  direction="maximize", pruner=pruner())


def trial_env(where: str | Path, name: str, trial_id: int) -> dict[str, str]:
    """The environment of the process that trains a trial's run."""
    return {**os.environ, ENV: json.dumps({"storage": str(where), "study": name, "trial": trial_id})}


def decide(accelerator, forecast: dict, step: int) -> dict:
    """Collective, for a run of a pruning sweep (else `forecast` as it is): reports the forecast's vouched odds of
    FAIL to the study at this update and asks its pruner; the main process decides and every rank follows. A pruned
    forecast carries `pruned`: the study, the trial and the odds it was pruned at."""
    told = os.environ.get(ENV)
    if not told:
        return forecast
    from accelerate.utils import broadcast_object_list

    decision = [None]
    if accelerator.is_main_process:
        where = json.loads(told)
        optuna = _optuna()
        study = optuna.load_study(study_name=where["study"], storage=storage(where["storage"]), pruner=pruner())
        trial = optuna.trial.Trial(study, where["trial"])
        fail = forecast["vouched"]["FAIL"]
        trial.report(fail, step)
        if trial.should_prune():
            decision = [{"study": where["study"], "trial": trial.number, "step": step, "fail_odds": fail}]
    pruned = broadcast_object_list(decision)[0]
    return {**forecast, "pruned": pruned} if pruned else forecast
