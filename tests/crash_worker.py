"""`finetune train` in a child process that SIGKILLs itself in the middle of writing its Nth checkpoint: the
state files are on disk (one of them cut in half), nothing is renamed into place yet."""

import os
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

from finetune.cli import main

kill_at = int(sys.argv[1])
original = Accelerator.save_state
calls = 0


def save_state_then_die(self, output_dir, *args, **kwargs):
    global calls
    calls += 1
    result = original(self, output_dir, *args, **kwargs)
    if calls == kill_at:
        victim = max(Path(output_dir).iterdir(), key=lambda p: p.stat().st_size)
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return result


Accelerator.save_state = save_state_then_die
sys.exit(main(["train", *sys.argv[2:]]))
