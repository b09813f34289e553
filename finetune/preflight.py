"""Checks that take seconds and save minutes: run by `finetune check` and by `finetune train` before the model loads.

The recipe's own validation (recipe.py) knows types and keys; here the world is asked: is the model where the recipe
says (a folder with a config, a GGUF file, a hub id the hub or the cache has), can the run folder be written, and do
the first rows of each dataset fit their format (columns present, rows usable, and, once a tokenizer is at hand,
prompts that leave target tokens within `data.max_length`)?
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from . import hub
from .errors import UserError
from .recipe import LOCAL_BUILDERS, DatasetSpec, EvalSection, ModelSection, Recipe

ROWS = 20  # first rows checked per dataset: enough to catch a wrong format, cheap on any file


class PreflightError(UserError):
    """Something a run would fail on after minutes of loading; the message names the key, file or row."""


def datasets_of(recipe: Recipe) -> list[tuple[str, DatasetSpec]]:
    """(recipe key, spec) for every dataset a run reads."""
    groups = [("data.train", recipe.data.train), ("data.validation", recipe.data.validation)]
    if recipe.data.replay:
        groups.append(("data.replay.datasets", recipe.data.replay.datasets))
    if recipe.train.l2sp_fisher:
        groups.append(("train.l2sp_fisher.datasets", recipe.train.l2sp_fisher.datasets))
    if recipe.train.kl_to_base:
        groups.append(("train.kl_to_base.datasets", recipe.train.kl_to_base.datasets))
    return [(f"{group}[{i}]", spec) for group, specs in groups for i, spec in enumerate(specs)]


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def check(recipe: Recipe) -> list[str]:
    """Raise PreflightError (or HubError) on the first problem; return notes worth printing (a cached hub copy used
    offline, ...). Nothing is loaded: the model is looked for, the data files' first rows are read."""
    notes = [_check_model(recipe), _check_output(recipe)]
    for key, spec in datasets_of(recipe):
        if is_local(spec.path):
            _check_rows(recipe, key, spec, None)
        else:
            notes.append(hub.ensure("dataset", spec.path, f"{key}.path"))
    named = [t for t in recipe.eval.tasks + recipe.eval.target_tasks if not t.endswith((".yaml", ".yml"))]
    notes.append(hub.ensure_tasks(named))
    _check_backend(recipe.model, recipe.eval)
    return [n for n in notes if n]


def check_tokens(recipe: Recipe, tokenizer) -> None:
    """The first rows of each local dataset encoded as training encodes them: targets must remain within
    `data.max_length`, and a chat format needs a chat template."""
    for key, spec in datasets_of(recipe):
        if is_local(spec.path):
            _check_rows(recipe, key, spec, tokenizer)


def tokenizer_at_hand(recipe: Recipe):
    """(tokenizer, "") when it loads without converting or downloading anything (what `check` may do); else
    (None, why the token lengths are not checked)."""
    from .model_files import converted_gguf, load_tokenizer

    section = recipe.model
    path = Path(section.path).expanduser()
    if path.suffix == ".gguf" and not converted_gguf(section).is_dir():
        return None, ("token lengths not checked: the GGUF file is converted to safetensors by the first "
                      "`finetune train` (about 15 s for 135M parameters); `check` again after it.")
    if not path.exists() and not hub.model_cached(section.path, section.revision):
        return None, "token lengths not checked: the model is not downloaded yet."
    return load_tokenizer(section, recipe.data.chat_template), ""


def check_sources(model: ModelSection, section: EvalSection) -> list[str]:
    """`finetune eval`'s base model and task names, checked as a recipe's are."""
    named = [t for t in section.tasks + section.target_tasks if not t.endswith((".yaml", ".yml"))]
    notes = [n for n in (_check_model_section(model), hub.ensure_tasks(named)) if n]
    _check_backend(model, section)
    return notes


def _check_backend(model: ModelSection, section: EvalSection) -> None:
    """vLLM, a GPU and one process, before the hours a run takes to reach its first evaluation."""
    if section.backend == "vllm" and (section.tasks or section.target_tasks):
        why = vllm_refusal(quantized=model.quantization is not None)
        if why:
            raise PreflightError(why)


def vllm_refusal(quantized: bool) -> str | None:
    """Why `eval.backend: vllm` cannot run here, in one line, or None."""
    if importlib.util.find_spec("vllm") is None:
        return ("eval.backend: vllm needs vLLM, which is not installed: `pip install vllm` (lm-eval's [vllm] extra) "
                "on a machine with a CUDA GPU, or set eval.backend: hf.")
    import torch

    if not torch.cuda.is_available():
        return "eval.backend: vllm needs a CUDA GPU and this machine has none; set eval.backend: hf (the default)."
    if quantized:
        return ("eval.backend: vllm would score the unquantized base, not the 4-bit one this run trains "
                "(model.quantization); set eval.backend: hf.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return ("eval.backend: vllm evaluates in one process (vLLM spreads a model over GPUs itself: "
                "eval.vllm_args.tensor_parallel_size); set eval.backend: hf for a launch of several processes, and "
                "measure the finished run with `finetune eval RUN` and eval.backend=vllm.")
    return None


def _check_model(recipe: Recipe) -> str:
    return _check_model_section(recipe.model)


def _check_model_section(section: ModelSection) -> str:
    path = Path(section.path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"`model.path` {section.path} is a folder without config.json, so not a Hugging Face "
                                 "model folder; point it at the folder that holds config.json and the weights.")
        return ""
    if path.is_file():
        if path.suffix != ".gguf":
            raise PreflightError(f"`model.path` {section.path} is a file but not a .gguf file; give a model folder, a "
                                 ".gguf file or a hub id.")
        return ""
    return hub.ensure("model", section.path, "model.path", section.revision)


def _check_output(recipe: Recipe) -> str:
    """The run folder, or the nearest folder above it that exists, takes a file (a probe, removed at once)."""
    out = Path(recipe.output.dir).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PreflightError(f"cannot write to the output folder {recipe.output.dir}: {e.strerror or e} ({existing}). "
                             "Set `output.dir` to a folder you can write to.") from None
    return ""


# ---------------------------------------------------------------- the first rows of a local file


def first_rows(path: Path, n: int = ROWS) -> list[dict]:
    """Up to n rows of a local data file, read as datasets reads it (JSON lines or a JSON list, CSV with a header,
    Parquet, text lines), without loading the whole file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=n)
        return next(batches).to_pylist() if path.stat().st_size else []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if suffix == ".csv":
            return [row for _, row in zip(range(n), csv.DictReader(f))]
        if suffix == ".txt":
            return [{"text": line.rstrip("\n")} for _, line in zip(range(n), f)]
        head = f.read(1 << 20)
    if not head.strip():
        return []
    rows = []
    for line in head.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
        if len(rows) == n:
            return rows
    if rows and all(isinstance(r, dict) for r in rows):
        return rows
    try:  # a JSON document: a list of rows
        whole = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as e:
        raise PreflightError(f"{path} is neither JSON lines nor a JSON list of rows ({e}).") from None
    return [r for r in whole[:n]] if isinstance(whole, list) else []


def _fitting_format(columns: set[str], current: str) -> str | None:
    """Another format whose fields the rows carry (rows with `text` in a chat recipe: `text`)."""
    from .formats import FORMATS

    return next((name for name, fmt in FORMATS.items()
                 if name != current and set(fmt.fields) - set(fmt.optional) <= columns), None)


def _check_rows(recipe: Recipe, key: str, spec: DatasetSpec, tokenizer) -> None:
    from .formats import FORMATS, make_encoder

    path = Path(spec.path)
    if path.suffix.lower() not in LOCAL_BUILDERS:
        return  # a local folder datasets knows how to read; it is checked when it loads
    rows = first_rows(path)
    if not rows:
        raise PreflightError(f"{key}: {spec.path} has no rows; it needs at least one.")
    if not all(isinstance(r, dict) for r in rows):
        raise PreflightError(f"{key}: {spec.path}: rows must be objects with named fields, e.g. "
                             '{"text": "..."}; the first row is ' f"{str(rows[0])[:80]}.")
    fmt = FORMATS[spec.format]
    columns = set().union(*(r.keys() for r in rows))
    names = {f: spec.columns.get(f, f) for f in fmt.fields}
    missing = [names[f] for f in fmt.fields if f not in fmt.optional and names[f] not in columns]
    if missing:
        wanted = [f for f in fmt.fields if f not in fmt.optional and names[f] not in columns]
        mapping = "`columns: {" + ", ".join(f"{f}: <your column>" for f in wanted) + "}`"
        other = _fitting_format(columns, spec.format)
        way_out = (f"Set `format: {other}` ({key}.format), or map your columns with {mapping}." if other else
                   f"Map your columns with {mapping}.")
        raise PreflightError(f"{key}: {spec.path} has no column(s) {missing}, which format `{spec.format}` needs; "
                             f"its rows have {sorted(columns)}. {way_out}")
    problems = []
    for i, row in enumerate(rows):
        mapped = {f: row.get(col) for f, col in names.items()}
        if why := fmt.check(mapped):
            problems.append((i, why))
    if tokenizer is not None and not problems:
        if fmt.needs_chat_template and not tokenizer.chat_template:
            raise PreflightError(f"{key}: format `{spec.format}` needs a chat template; the tokenizer of "
                                 f"{recipe.model.path} has none, so set `data.chat_template` or use format "
                                 "`instruction`.")
        encode = make_encoder(tokenizer, spec.format, spec.columns, recipe.data.max_length, recipe.data.train_on,
                              spec.system)
        batch = {col: [r.get(col) for r in rows] for col in columns}
        encoded = encode(batch, list(range(len(rows))))
        problems = [(i, why) for i, why in enumerate(encoded["error"]) if why]
    bad = len(problems)
    if problems and (recipe.data.on_bad_row == "fail" or bad == len(rows)):
        i, why = problems[0]
        advice = (" Raise `data.max_length` or shorten the prompts: targets must start within it." if "max_length" in
                  why else "")
        skip = " (data.on_bad_row: skip would skip such rows)" if recipe.data.on_bad_row == "fail" else \
            f" (all {bad} rows checked are bad, so skipping them leaves nothing)"
        raise PreflightError(f"{key}: {spec.path} row {i} (counted from 0): {why}.{advice}{skip}")
