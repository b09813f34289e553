"""Cheap probes of forgetting while a run trains: forward passes on two small fixed sets, every few updates, into
metrics.jsonl. Whole evaluations come after the run (or every `eval.every` updates); these cost a few percent of
training time and exist from the first updates, so a forecast can be made early (the issue on knowing early).

  - `probe_kl_task`: KL(base || tuned) per position at the first PROBE_TOKENS reply tokens of the new task's own
    rows (the first rows of data.train's first dataset, its answers teacher-forced): how far the run has moved where
    it is trained ("RL's Razor", Shenfeld et al. 2025: forgetting grows with this KL);
  - `probe_kl_general`: the same at the first reply token of general short prompts (probe_prompts.json, written for
    this project), where a reply's format is decided and a fine-tune overwrites it first ("spurious forgetting",
    Zheng et al. 2025);
  - `probe_leak`: the probability the model gives, at that first reply token, to the first token of one of the new
    task's answers (when it has few short answers): a forward-pass stand-in for the report's answer leak.

The base's distributions are taken once, before the first update, from the model itself (the weights are still the
base's). The rows are shared by the ranks of a launch and the sums added up; every rank runs one forward per set, as
FSDP and DeepSpeed need.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, send_to_device

from .data import IGNORE, Collator, DataStats, encode_dataset
from .loss import logits_at
from .mitigations.kl_to_base import first_of_each_run
from .model import eval_mode
from .reports.forecast import FEWEST, calibration_at, forecast_run, read_rows

PROMPTS = Path(__file__).with_name("probe_prompts.json")
PROBE_TOKENS = 4  # reply tokens of a new-task row probed
ROWS = 12  # new-task rows probed
MAX_ANSWERS = 32  # a new task with more distinct first answer tokens, or longer answers (end-of-turn tokens
MAX_ANSWER_TOKENS = 8  # included), has no answer leak to probe
MIN_PREFIX = 8  # shared first tokens worth a forward pass of their own
FORECAST_SHARE = 0.1  # the first forecast comes after the last probe within this share of the updates


def schedule(every: int | None, max_steps: int) -> set[int]:
    """The updates after which the probes run: `every` N updates and the last; None: none; 0: the last power of two
    within the first 10% of updates (where the first forecast is made; 1 where there is none), the powers of two
    after it up to 16, then every 16, never the last update (no forecast is made there: the whole evaluation
    follows). For 60 updates: 4, 8, 16, 32 and 48, five probes where a probe costs about an update on the demo."""
    if every is None:
        return set()
    if every:
        return set(range(every, max_steps + 1, every)) | {max_steps}
    first = 1
    while 2 * first <= FORECAST_SHARE * max_steps:
        first *= 2
    return {s for s in (1, 2, 4, 8) if first <= s < max_steps} | set(range(16, max_steps, 16)) - set(range(first))


def within_budget(spent: float, next_probe: float, seconds: float, updates: int, max_steps: int,
                  budget: float) -> bool:
    """Whether one more probe, about as long as the last (`next_probe` seconds), keeps the probes' time (`spent`)
    within `budget` of the run's updates' time, forecast for all `max_steps` from the `updates` this process took in
    `seconds` besides its probes."""
    return spent + next_probe <= budget * seconds / updates * max_steps


def forecast_points(steps: set[int], max_steps: int) -> list[int]:
    """The probed updates after which a run forecasts its final forgetting: the last within the first 10% of its
    updates and every later one but the last."""
    early = [s for s in steps if s <= FORECAST_SHARE * max_steps]
    return [s for s in sorted(steps) if early and max(early) <= s < max_steps]


def logged_points(probes: dict, max_steps: int) -> list[int]:
    """Where a run whose probes a calibration row holds would have forecast with the default schedule."""
    return forecast_points({int(s) for s in probes} & schedule(0, max_steps), max_steps)


class Probes:
    """Created after `accelerator.prepare` and before a checkpoint is loaded, while the weights are the base's."""

    def __init__(self, recipe, accelerator, model, tokenizer, max_steps: int):
        self.accelerator = accelerator
        self.steps = schedule(recipe.train.probe_every, max_steps)
        # The default schedule is the one sized to cost little: on a run of short updates (the demo's, 4 rows of
        # ~35 tokens) a probe costs about an update, where on one of 16x512-token updates it costs ~2% of one.
        self.budget = recipe.train.probe_budget if recipe.train.probe_every == 0 else None
        self.spent, self.last, self.left_out = 0.0, None, []
        self.max_steps, self.max_drop = max_steps, recipe.eval.max_drop
        path = recipe.eval.forecast_calibration
        rows = read_rows(Path(path)) if path and recipe.eval.tasks else None
        points = forecast_points(self.steps, max_steps)
        self.forecast_step = points[0] if points and rows is not None else None
        # The first forecast comes after the last probe within the first 10% of updates; it is made again after
        # each later probe but the last (the whole evaluation follows that), which a sweep's pruner and
        # eval.on_over_budget: stop act on as the run goes. Each is fitted on the calibration runs probed at the
        # same share of their updates: the KLs grow fivefold and more from one early probe to the next, so another
        # run's update 4 says little of what this run's update 6 means.
        self.calibration: dict[int, list[dict]] | None = None if rows is None else {}
        if self.forecast_step is not None:
            for s in points:
                runs = calibration_at(rows, s / max_steps)
                if len(runs) >= FEWEST or s == self.forecast_step:
                    self.calibration[s] = runs
        self.history: dict[int, dict[str, float]] = {}
        if not self.steps:
            return
        self.collate = Collator(tokenizer.pad_token_id, "padding")
        examples = encode_dataset(recipe.data.train[0], tokenizer, recipe.data, DataStats()).with_format(None)
        task = [(e["input_ids"], e["target"]) for e in examples.select(range(min(ROWS, len(examples))))]
        general = [_prompt_row(tokenizer, p) for p in json.loads(PROMPTS.read_text(encoding="utf-8"))]
        self.prompts = len(general)
        self.answers = _answer_tokens(examples)
        rank, world = accelerator.process_index, accelerator.num_processes
        # Decided on every rank's rows alike: a sharded model needs every rank to run the same forwards.
        self.shared = {"task": _shared_prefix(task), "general": _shared_prefix(general)}
        self.rows = {"task": task[rank::world], "general": general[rank::world]}
        self.tokens = {"task": PROBE_TOKENS, "general": 1}
        self.base = {name: self._log_probs(model, name) for name in self.rows}
        self.base_leak = self._leak(self.base["general"]) / len(general) if self.answers is not None else None

    def due(self, step: int, seconds: float, updates: int) -> bool:
        """Whether the probes run after this update, `updates` of this process's having taken `seconds`, probes
        included. Under train.probe_budget a probe after the first is left out, and every later one, where it would
        take the probes over their share; the main process decides for every rank (the probes are forwards every
        rank runs)."""
        if step not in self.steps or step in self.left_out:
            return False
        if self.budget is None or self.last is None:
            return True
        keep = broadcast_object_list(
            [within_budget(self.spent, self.last, seconds - self.spent, updates, self.max_steps, self.budget)])[0]
        if not keep:
            self.left_out = sorted(s for s in self.steps if s >= step)
        return keep

    def left_out_text(self) -> str:
        return (f"probes after updates {', '.join(map(str, self.left_out))} left out: they would take the probes "
                f"over {self.budget:.0%} of the updates' time (train.probe_budget; {self.spent:.1f} s so far, "
                f"{self.last:.1f} s the last)")

    def describe(self) -> str:
        leak = "" if self.base_leak is None else f"; the base's answer leak {self.base_leak:.3f}"
        if self.calibration is None:
            forecast = ""
        elif self.forecast_step is None:
            forecast = f"; no forecast: no probe within the first {FORECAST_SHARE:.0%} of the updates"
        elif len(self.calibration[self.forecast_step]) < FEWEST:
            forecast = (f"; no forecast: {len(self.calibration[self.forecast_step])} calibration runs have a probe "
                        f"at the share of their updates that update {self.forecast_step} of {self.max_steps} is, and "
                        f"a forecast needs {FEWEST}")
        else:
            at = ", ".join(f"{s} ({len(runs)})" for s, runs in self.calibration.items())
            forecast = (f"; forecasts of the final forgetting after updates {at}: from the calibration runs "
                        "(eval.forecast_calibration) probed at the same share of their updates")
        budget = "" if self.budget is None else (f"; those after the first while the probes take at most "
                                                 f"{self.budget:.0%} of the updates' time, train.probe_budget")
        return (f"probes: KL to the base on the new task's first rows and on {self.prompts} general "
                f"prompts{leak}, after updates {', '.join(map(str, sorted(self.steps)))} (train.probe_every"
                f"{budget}){forecast}")

    def forecast(self, step: int, probed: dict[str, float]) -> dict | None:
        """The forecast of the final forgetting (reports/forecast.py) once the probes of its update are in: after
        the last probe within the first 10% of updates, and again after each later probe but the last that enough
        calibration runs have at the same share of their updates; None at other updates, without a calibration,
        or when it is too small to fit."""
        self.history[step] = probed
        if not self.calibration or len(self.calibration.get(step, ())) < FEWEST:
            return None
        return forecast_run(self.calibration[step], self.history, self.max_steps, self.max_drop,
                            step / self.max_steps)

    def measure(self, model) -> dict[str, float]:
        """Collective: the probes of the model as it is now, the same on every rank (their seconds: `last`)."""
        began = time.perf_counter()
        probed = self._measure(model)
        self.last = time.perf_counter() - began
        self.spent += self.last
        return probed

    @torch.no_grad()
    def _measure(self, model) -> dict[str, float]:
        now = {name: self._log_probs(model, name) for name in self.rows}
        sums = []  # this rank's KL sum and positions per set, then its leak sum and general rows
        for name in self.rows:
            kl = torch.nn.functional.kl_div(now[name], self.base[name], reduction="sum", log_target=True)
            sums += [kl.item(), len(now[name])]
        sums += [self._leak(now["general"]) if self.answers is not None else 0.0, len(self.rows["general"])]
        totals = torch.tensor(sums, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, "sum")
        kl_task, n_task, kl_general, n_general, leak, rows = totals.tolist()
        out = {"probe_kl_task": kl_task / max(n_task, 1), "probe_kl_general": kl_general / max(n_general, 1)}
        if self.answers is not None:
            out["probe_leak"] = leak / max(rows, 1)
        return out

    @torch.no_grad()
    def _log_probs(self, model, name: str) -> torch.Tensor:
        """[positions, vocab] log-probabilities at the probed positions of this rank's rows of one set. A rank with
        no rows still runs a forward (on a stand-in row, dropped), as a sharded model needs every rank to."""
        rows = self.rows[name] or self.rows["general"][:1] or self.rows["task"][:1]
        shared = self.shared[name]
        batch = send_to_device(self.collate([[(ids[shared:], target[shared:])] for ids, target in rows]),
                               self.accelerator.device)
        batch.pop("n_tokens")
        keep = first_of_each_run(batch.pop("labels") != IGNORE, self.tokens[name])
        # Eager even when train.compile is on: a no-grad forward fails the compiled graph's grad-mode guard, and
        # compiling a second graph costs more than all the probes of a run (minutes for 135M on 2 cores).
        with eval_mode(model), self.accelerator.autocast(), torch.compiler.set_stance("force_eager"):
            if shared:
                # The rows' common start (a chat template's system turn: over half of each short row) runs once;
                # the rest of every row attends to its keys and values, at the positions after it.
                prefix = torch.tensor([rows[0][0][:shared]], device=self.accelerator.device)
                cache = model(input_ids=prefix, use_cache=True).cache  # transformers 5: `cache`, not past_key_values
                cache.batch_repeat_interleave(len(rows))
                ones = torch.ones(len(rows), shared, dtype=batch["attention_mask"].dtype, device=prefix.device)
                batch.update(attention_mask=torch.cat([ones, batch["attention_mask"]], dim=1),
                             position_ids=batch["position_ids"] + shared, cache=cache, use_cache=True)
            logits = logits_at(model, batch, keep)
        logits = logits if self.rows[name] else logits[:0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _leak(self, log_probs: torch.Tensor) -> float:
        """The summed probability, over this rank's general rows, of the new task's first answer tokens."""
        return float(log_probs[:, self.answers].exp().sum()) if len(log_probs) else 0.0


def _shared_prefix(rows: list[tuple[list[int], list[int]]]) -> int:
    """How many first tokens every row of a set shares, up to the position before its first target (the probed
    positions stay after it); 0 where that is under MIN_PREFIX tokens or there is one row."""
    if len(rows) < 2:
        return 0
    longest = min(list(target).index(1) if 1 in target else len(ids) for ids, target in rows) - 1
    first, n = rows[0][0], 0
    while n < longest and all(ids[n] == first[n] for ids, _ in rows):
        n += 1
    return n if n >= MIN_PREFIX else 0


def _prompt_row(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """A general prompt as the model is asked it (the chat template's generation prompt where there is one), with
    one stand-in reply token marked as target: the probed position is the one that predicts the reply's first token."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = list(ids) + [tokenizer.eos_token_id]
    return ids, [0] * (len(ids) - 1) + [1]


def _answer_tokens(examples) -> list[int] | None:
    """The first tokens of the new task's answers (its encoded examples), or None when they are not a few short
    answers (a leak into general replies means nothing for open-ended targets)."""
    firsts, lengths = set(), []
    for e in examples:
        targets = [t for t, is_target in zip(e["input_ids"], e["target"]) if is_target]
        if targets:
            firsts.add(targets[0])
            lengths.append(len(targets))
    if not firsts or len(firsts) > MAX_ANSWERS or max(lengths) > MAX_ANSWER_TOKENS:
        return None
    return sorted(firsts)
