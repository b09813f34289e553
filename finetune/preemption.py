"""SIGTERM and SIGINT stop a run at the next step boundary, after a checkpoint, with a distinct exit code."""

from __future__ import annotations

import signal

import torch


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved at the step boundary that followed."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which is what a requeued run does


class StopSignals:
    """SIGTERM (SLURM preemption, `kill`) and SIGINT (Ctrl-C) ask the run to stop at the next step boundary.
    A second signal of the same kind is not caught: it stops the process at once."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum])

    def agreed(self, accelerator) -> bool:
        """True on every rank once any rank got a signal, so all save the same step and stop together."""
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() if accelerator.num_processes > 1 else flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
