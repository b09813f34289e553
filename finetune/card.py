"""`final/` made portable and described: the adapter names its base as the hub knows it, and README.md is a model card
(base model, data, method, recipe, and the forgetting verdict with its table).

A saved adapter records its base in `adapter_config.json` (`base_model_name_or_path`). finetune loads a hub model by
its id but a GGUF file from a converted folder in a local cache, whose path means nothing on another machine; so the
base is named by `model.name`, the hub id, or the source a GGUF file records, and the local path is kept in
`final/finetune.json`, which finetune's own commands (merge, chat) look at first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import FINAL_INFO, RunDir
from .files import atomic_write_text, read_jsonl
from .recipe import ModelSection, Recipe, dump_recipe


def base_name(section: ModelSection) -> str | None:
    """The name a base model goes by off this machine: `model.name`, the hub id, or a GGUF file's recorded source."""
    if section.name:
        return section.name
    path = Path(section.path).expanduser()
    if not path.exists():
        return section.path  # a hub id
    return _gguf_source(path) if path.suffix == ".gguf" else None


def _gguf_source(path: Path) -> str | None:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for key in ("general.source.huggingface.repository", "general.source.url", "general.source.repo_url"):
        if key in fields:
            value = str(fields[key].contents())
            match = re.match(r"^(?:https?://huggingface\.co/)?([\w.-]+/[\w.-]+)/?$", value)
            if match:
                return match.group(1)
    return None


def make_portable(folder: Path, section: ModelSection) -> None:
    """Name the base by its hub name in adapter_config.json and keep the local path in finetune.json."""
    from .model import resolve_model_path

    name, local = base_name(section), resolve_model_path(section)
    info = {"base_model": name, "base_model_path": local if Path(local).is_dir() else None, "model_path": section.path}
    atomic_write_text(folder / FINAL_INFO, json.dumps(info, indent=1) + "\n")
    adapter = folder / "adapter_config.json"
    if name and adapter.is_file():
        config = json.loads(adapter.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = name
        atomic_write_text(adapter, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(recipe: Recipe, run: RunDir) -> None:
    """final/README.md, and final/ made portable. Main process, after final/ and the forgetting report exist."""
    if not run.final.is_dir():
        return
    make_portable(run.final, recipe.model)
    refresh_model_card(recipe, run)


def refresh_model_card(recipe: Recipe, run: RunDir) -> None:
    """final/README.md only (a later `finetune eval` brings a new verdict): the rest of final/ stays as training
    wrote it, and nothing resolves the base model again (a GGUF base would be converted anew)."""
    if run.final.is_dir():
        atomic_write_text(run.final / "README.md", model_card(recipe, run))


def _forgetting(run: RunDir) -> list[str]:
    folder = run.path / "forgetting"
    report_md, report_json = folder / "report.md", folder / "report.json"
    if not report_md.is_file():
        return ["No forgetting report: the recipe lists no `eval.tasks`. Measure one with "
                f"`finetune eval BASE {run.path}`.", ""]
    verdict = json.loads(report_json.read_text(encoding="utf-8"))["verdict"]["text"] if report_json.is_file() else ""
    body = report_md.read_text(encoding="utf-8")
    # The report's measurements (its sections up to "How to read this"), one heading level down.
    sections = body.split("\n## How to read this")[0].split("\n## ", 1)
    tables = ("### " + sections[1]).replace("\n## ", "\n### ") if len(sections) > 1 else ""
    return [f"**{verdict}**" if verdict else "", "", tables.rstrip(), "",
            f"The full report, with how to read it and plots: `{folder.name}/report.html` in the run folder.", ""]


def _training(recipe: Recipe, run: RunDir) -> list[str]:
    tr, data = recipe.train, recipe.data
    sets = ", ".join(f"`{Path(d.path).name if Path(d.path).exists() else d.path}` ({d.format}"
                     f"{f', weight {d.weight:g}' if d.weight != 1 else ''})" for d in data.train)
    records = [r for r in read_jsonl(run.metrics) if isinstance(r, dict) and "loss" in r]
    rows = [("data", f"{sets}; up to {data.max_length} tokens per example"
                     f"{', packed' if data.packing else ''}; targets: {data.train_on}"),
            ("updates", f"{records[-1]['step'] if records else tr.max_steps} of {tr.batch_size} rows per process x "
                        f"{tr.grad_accum} accumulation step(s)"),
            ("optimizer", f"AdamW, lr {tr.lr:g}, {tr.schedule} schedule, {tr.warmup_steps} warmup updates, weight "
                          f"decay {tr.weight_decay:g}, seed {tr.seed}")]
    if records:
        last = records[-1]
        vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        rows.append(("loss", f"{records[0]['loss']:.4f} -> {last['loss']:.4f}"
                             + (f" (validation {vals[-1]:.4f})" if vals else "")))
        rows.append(("tokens", f"{last['tokens']:,} ({last['target_tokens']:,} of them targets)"))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def model_card(recipe: Recipe, run: RunDir) -> str:
    from . import __version__
    from .mitigations import method_kind, method_label

    name = base_name(recipe.model)
    adapter = (run.final / "adapter_config.json").is_file()
    lora = recipe.lora
    kind = method_kind(recipe).split()[0]  # QLoRA, LoRA or full
    method = (f"a {kind} adapter (r {lora.r}, alpha {lora.alpha:g}, modules {', '.join(lora.target_modules)}"
              f"{f' of layers {lora.first_layer} up' if lora.first_layer else ''}"
              f"{', DoRA' if lora.use_dora else ''}{', rsLoRA' if lora.use_rslora else ''})" if lora
              else "full fine-tuning of every weight")
    source = f" (loaded from `{recipe.model.path}`)" if name and name != recipe.model.path else ""
    base = f"**{name}**{source}" if name else f"`{recipe.model.path}` (a local model with no hub name)"
    front = ["---", *([f"base_model: {name}"] if name else []),
             f"library_name: {'peft' if adapter else 'transformers'}", "tags:", "- finetune",
             f"- {'lora' if lora else 'full-fine-tuning'}", "---", ""]
    auto = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    load = ["```python", f"from {'peft' if adapter else 'transformers'} import {auto}",
            "from transformers import AutoTokenizer", "",
            f'model = {auto}.from_pretrained("final")' + ("  # on the base named in adapter_config.json" if adapter
                                                          else ""),
            'tokenizer = AutoTokenizer.from_pretrained("final")', "```"]
    return "\n".join([
        *front, f"# {run.path.name}", "",
        f"Fine-tuned from {base} with finetune {__version__}: {method}. Comparisons call it "
        f"`{method_label(recipe)}`.", "",
        "## Training", "", *_training(recipe, run),
        "## What it forgot", "", *_forgetting(run),
        "## Use", "", f"In a terminal: `finetune chat {run.path}`. In Python:", "", *load, "",
        "## Recipe", "", "The resolved recipe (every default filled in); `finetune train` on it reproduces the run:",
        "",
        "```yaml", dump_recipe(recipe).rstrip(), "```", ""])
