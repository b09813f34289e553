"""Files a run writes and reads again: written aside then renamed (a crash never leaves half a file that a later
run would trust), JSON-lines that a crash may have cut short, and the folders new runs and reports go to."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from .errors import UserError


class DamagedFileError(UserError):
    """A file finetune wrote was changed or damaged; the message names it and the line."""


def atomic_write_text(path: Path, text: str) -> None:
    """Written aside, then renamed into place. The file aside has a name of its own: two processes writing the same
    file (a pruning sweep's workers) would otherwise share it, and the second rename find it gone. (Not mkstemp: its
    files are private to the owner, and a run's files keep the usual permissions.)"""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file that is appended to as a run goes (metrics, curves). Its last line may have
    been cut short by a crash: it is dropped. A bad line before the last is not a crash's doing and is an error."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines):
                break
            raise DamagedFileError(f"{path} line {i} is not JSON; the file was edited or damaged. Move it aside to go "
                              "on without it.") from None
    return rows


def next_free_dir(path: Path) -> Path:
    """`runs/x-2`, `runs/x-3`, ...: the first sibling that does not exist yet."""
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return candidate


def report_dir(out: Path | None, default: Path) -> Path:
    """The folder a new report goes to: `out` as given, refused if it holds anything (nothing is overwritten); else
    `default`, or its next free sibling (-2, -3, ...) when that one holds files (an earlier report stays as it is)."""
    chosen = out or default
    if chosen.exists() and (chosen.is_file() or any(chosen.iterdir())):
        if out:
            raise UserError(f"{out} already holds files; nothing is overwritten. Choose another --out.")
        chosen = next_free_dir(chosen)
    return chosen
