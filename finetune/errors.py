"""Mistakes a user can fix, and who says things: the CLI prints a mistake's message as one paragraph and exits 2,
without a traceback; in a launch of N processes the main one says it (and anything else), once. A leaf module, so
that every other module may import it."""

import os
import sys


class UserError(Exception):
    """Base of every error whose message names the file, key or row and says what to do."""


def main_process() -> bool:
    """Rank 0 of a launch (torchrun and accelerate set RANK), or a process launched alone."""
    return os.environ.get("RANK", "0") == "0"


def print_main(*lines: str, file=None) -> None:
    """Print on the main process only: a launch of N processes says a thing once, not N times."""
    if main_process():
        for line in lines:
            if line:
                print(line, file=file or sys.stdout, flush=True)


class UpstreamChanged(UserError):
    """A dependency's release no longer has an internal part finetune leans on (tests/test_contracts.py pins each)."""

    def __init__(self, package: str, part: str):
        from importlib.metadata import version

        super().__init__(f"{package} {version(package)} no longer has `{part}`, which finetune uses; this {package} "
                         f"release is not supported yet. Install the version finetune was tested with: `bash "
                         f"scripts/install.sh` in finetune's checkout (requirements.lock), or "
                         f"`pip install '{package}<{version(package)}'`.")
