"""Forgetting measured while a run trains: the base before the first update, the model every `eval.every` updates
and after the last, the forgetting budget (`eval.max_drop`, `eval.on_over_budget`) and the report at the end.

Every rank evaluates its share of the documents and drift texts (evaluate.ForgettingEval with the launch's ranks)
and ends with the same results; the main process writes the curve and the report. Under DDP each rank measures its
unwrapped model; under FSDP or DeepSpeed no single rank holds all the weights, so each measures a whole copy that the
ranks gather at each evaluation (gather.whole_model).
"""

from __future__ import annotations

import os
import shutil
import time

from accelerate.utils import broadcast_object_list

from .files import read_jsonl
from .measure.evaluate import ForgettingEval
from .reports.forgetting import FAIL, budget_status, choose_best
from .measure.gather import whole_model
from .measure.lm_eval_samples import write_lm_eval_logs
from .mitigations import describe, wise_ft_end
from .recipe import Recipe
from .reports.report import build_report, provenance, write_report
from .measure.sharing import Ranks


class TrainingEval:
    """Created after `accelerator.prepare` and before a checkpoint is loaded, while the weights are the base's."""

    def __init__(self, recipe: Recipe, run, accelerator, tokenizer, model, resumed_step: int):
        self.recipe, self.run, self.accelerator = recipe, run, accelerator
        section = recipe.eval
        self.enabled = bool(section.tasks or section.target_tasks)
        self.fe = None
        # Seconds spent measuring, for the run's summary: the base (once; cached for later runs), evaluations during
        # training (eval.every) and the last model's (its report's writing is saving).
        self.seconds = {"base": 0.0, "during": 0.0, "last": 0.0}
        started = time.monotonic()
        if self.enabled:
            self.fe = ForgettingEval(section, recipe.model, tokenizer, curve_file=run.path / "forgetting" /
                                     "curve.jsonl", resumed_step=resumed_step, ranks=Ranks.of(accelerator))
            with self._whole(model) as base:
                self.fe.evaluate_base(base)
        accelerator.wait_for_everyone()
        self.seconds["base"] = time.monotonic() - started

    def due(self, step: int, max_steps: int) -> bool:
        return self.enabled and bool(self.recipe.eval.every) and step % self.recipe.eval.every == 0 \
            and step < max_steps

    def check(self, step: int, model, tokenizer, save) -> bool:
        """Collective. Measures the model after `step` updates; keeps it as best/ when the budget policy wants
        it; returns True on every rank when the run must stop (`on_over_budget: stop` and the verdict is FAIL: a drop
        beyond the budget and beyond doubt; an INCONCLUSIVE step trains on)."""
        policy = self.recipe.eval.on_over_budget
        verdict = [False, False]  # over budget, new best within budget
        started = time.monotonic()
        with self._whole(model) as whole:
            point = self.fe.evaluate(whole, step)
        self.seconds["during"] += time.monotonic() - started
        if self.accelerator.is_main_process:
            status = budget_status(self.fe.base.tasks, point.tasks, self.recipe.eval.max_drop)
            verdict[0] = status == FAIL
            best = choose_best(self.fe.base, self.fe.curve, self.recipe.eval.max_drop)
            verdict[1] = policy != "continue" and best is point
            self.accelerator.print(f"step {step}: forgetting verdict {status} (eval.max_drop="
                                   f"{self.recipe.eval.max_drop})")
        # The main process decides, so that every rank takes the same branch (the ranks' results are the same).
        over, new_best = broadcast_object_list(verdict)
        if new_best:
            save(self.run.path / "best")  # collective: every rank takes part
        return over and policy == "stop"

    def finish(self, step: int, model, tokenizer) -> None:
        """Collective. After final/ is saved: measure the last model, pick what final/ is, write forgetting/report.*
        (writing is counted as saving in the run's summary, not as measuring: its plots and lm-eval logs took ~1 s
        of the demo's 60)."""
        started = time.monotonic()
        if self.enabled:
            last = next((e for e in self.fe.curve if e.step == step), None)
            if last is None:
                with self._whole(model) as whole:
                    last = self.fe.evaluate(whole, step)
            self.seconds["last"] = time.monotonic() - started
            if self.accelerator.is_main_process:
                self._report(step, last)
        self.accelerator.wait_for_everyone()

    def _whole(self, model):
        return whole_model(self.accelerator, model, self.recipe.model, self.recipe.lora)

    def _forecast(self) -> dict | None:
        """The last forecast the run logged in metrics.jsonl during training, if it made one, with what the first
        (after 10% of the updates) said when it made later ones."""
        made = [r["forecast"] for r in read_jsonl(self.run.metrics) if "forecast" in r]
        if len(made) > 1:
            return {**made[-1], "first": {k: made[0][k] for k in ("step", "odds", "verdict", "vouched")}}
        return made[-1] if made else None

    def _report(self, step: int, last) -> None:
        fe, section = self.fe, self.recipe.eval
        chosen, note = last, f"final/ is the model after step {step}, the last update"
        if wise_ft_end.label(self.recipe):
            note += (f", with the adapter's update scaled by {self.recipe.lora.wise_ft_alpha:g} (lora.wise_ft_alpha, "
                     "WiSE-FT)")
        best = choose_best(fe.base, fe.curve, section.max_drop) if section.on_over_budget != "continue" else None
        if best is not None and best.step != step and (self.run.path / "best").is_dir():
            # The last model goes beside final/, never lost; final/ becomes the best model within budget.
            os.replace(self.run.final, self.run.path / "last")
            os.replace(self.run.path / "best", self.run.final)
            chosen = best
            note = (f"final/ is the model after step {best.step}: of the evaluated steps within the forgetting "
                    f"budget, it gained most on the target tasks (eval.on_over_budget: {section.on_over_budget}). "
                    f"The last model (step {step}) is in last/.")
        elif best is None and section.on_over_budget != "continue":
            note += "; no evaluated step stayed within the forgetting budget"
        shutil.rmtree(self.run.path / "best", ignore_errors=True)
        report = build_report(fe.base, chosen, max_drop=section.max_drop, curve=fe.curve,
                              provenance=provenance(self.recipe, fe.precision), final_note=note, method=describe(self.recipe),
                              forecast=self._forecast())
        write_report(self.run.path / "forgetting", report)
        for line in write_lm_eval_logs(self.run.path / "forgetting" / "lm-eval", {"base": fe.base, "tuned": chosen},
                                       {"base": self.recipe.model.path, "tuned": str(self.run.final)},
                                       chat=section.apply_chat_template, limit=section.limit):
            self.accelerator.print(f"note: {line}")
        self.accelerator.print(f"forgetting report: {self.run.path / 'forgetting' / 'report.html'} — "
                               f"{report['verdict']['text']}")
