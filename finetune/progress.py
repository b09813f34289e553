"""What a person watching a run sees: a progress bar on a terminal (loss, learning rate, tokens/s, the last validation
loss), plain periodic lines when stderr goes to a file, and a summary when the run ends. The main process shows it;
the loop only hands over each step and each metrics record."""

from __future__ import annotations

import statistics
import sys
import time
from collections import deque

from .checkpoint import RunDir
from .files import read_jsonl

RATE_WINDOW = 10  # logged windows the shown tokens/s is the median of: a checkpoint or evaluation pause in one
# window would otherwise make the rate jump by orders of magnitude for that window
LINES = 20  # plain lines per run when stderr is not a terminal (plus one at least every LINE_EVERY_S)
LINE_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainingDisplay:
    """Shown by the main process only. `step()` after every update, `record(r)` with every metrics.jsonl line."""

    def __init__(self, show: bool, total: int, initial: int, stream=None):
        self.stream = stream or sys.stderr
        self.show, self.total, self.step_now = show, total, initial
        self.rates: deque[float] = deque(maxlen=RATE_WINDOW)
        self.last: dict = {}
        self.val_loss: float | None = None
        self.started = self.last_line = time.monotonic()
        self.every = max(1, -(-(total - initial) // LINES))
        self.bar = None
        if show and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", file=self.stream,
                            dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                            "[{elapsed}<{remaining}{postfix}]")

    def _fields(self) -> list[str]:
        r = self.last
        if not r:
            return []
        rate = statistics.median(self.rates) if self.rates else 0.0
        fields = [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"{rate:,.0f} tok/s"]
        if self.val_loss is not None:
            fields.append(f"val {self.val_loss:.4f}")
        return fields

    def record(self, record: dict) -> None:
        self.last = record
        if record.get("tokens_per_s") is not None:
            self.rates.append(record["tokens_per_s"])
        if record.get("val_loss") is not None:
            self.val_loss = record["val_loss"]
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(self._fields()), refresh=False)

    def step(self) -> None:
        self.step_now += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.show:
            now = time.monotonic()
            if self.step_now % self.every == 0 or self.step_now == self.total or now - self.last_line >= LINE_EVERY_S:
                self.last_line = now
                print(f"step {self.step_now}/{self.total} ({_duration(now - self.started)}): "
                      + ", ".join(self._fields()), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line among the updates (a forecast, a stop): printed above the bar, which tqdm then draws again, so the
        two do not run into each other on a terminal."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        elif self.show:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(run: RunDir, seconds: float, parts: dict[str, float] | None = None) -> str:
    """The end of a run in a few lines: what was trained, how the loss went, where the time went, where everything
    is. `parts`: seconds spent on the updates (probes and validation included) and, where the run measures
    forgetting, on its evaluation and of that on the base model (once; cached for later runs)."""
    records = [r for r in read_jsonl(run.metrics) if isinstance(r, dict) and "loss" in r]
    lines = []
    if records:
        first, last = records[0], records[-1]
        vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        val = f", validation loss {vals[-1]:.4f}" if vals else ""
        lines.append(f"done: {last['step']} updates in {_duration(seconds)}; loss {first['loss']:.4f} -> "
                     f"{last['loss']:.4f}{val}; {last['tokens']:,} tokens trained on ({last['target_tokens']:,} "
                     "targets)")
    else:
        lines.append(f"done in {_duration(seconds)}")
    if parts:
        rest = seconds - parts["updates"] - parts.get("evaluation", 0.0)
        evaluation = (f"; forgetting evaluation {_duration(parts['evaluation'])}, of which the base model "
                      f"{_duration(parts['base'])}" if "evaluation" in parts else "")
        probed = sum(r.get("seconds_probing", 0.0) for r in records)
        probes = f" (of which the probes {_duration(probed)}, train.probe_every)" if probed else ""
        lines.append(f"  time:    updates {_duration(parts['updates'])}{probes}{evaluation}; loading, data and saving "
                     f"{_duration(rest)}")
    adapter = (run.final / "adapter_config.json").is_file()
    lines.append(f"  model:   {run.final}/ ({'LoRA adapter' if adapter else 'full model'}; model card README.md; "
                 f"try it: finetune chat {run.path})")
    lines.append(f"  metrics: {run.metrics}")
    report = run.path / "forgetting" / "report.html"
    if report.is_file():
        lines.append(f"  report:  {report}")
    return "\n".join(lines)
