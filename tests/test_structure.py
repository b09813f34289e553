"""The code's shape, where a slip would not show in behaviour until later: no import cycle, comparing reports without
torch, one table of data formats, records that round-trip, a mitigation found by its module alone."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import finetune
from finetune import mitigations
from finetune.data import FORMATS
from finetune.recipe import LOCAL_BUILDERS, DatasetSpec, load_recipe
from finetune.reports.records import Drift, Evaluation, TaskScore, from_dict, to_dict

from conftest import make_recipe, metrics, run

PACKAGE = Path(finetune.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of the code (function-level imports too)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("finetune", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in names}
        graph[name] = found - {name}
    return graph


def test_the_package_import_graph_has_no_cycle():
    graph, done, path = _import_graph(), set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in graph[module]:
            visit(dependency)
        path.pop()
        done.add(module)

    assert "finetune.reports.report" in graph and graph["finetune.measure.evaluate"]  # the graph was really read
    for module in graph:
        visit(module)


def _code_map() -> dict[str, int]:
    """Module -> its layer's rank in the README's code map (0: the commands, at the top)."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| layer | module | what it holds |"):].split("\n\n")[0].splitlines()[2:]
    layers, ranks = [], {}
    for row in table:
        layer, modules, holds = (c.strip() for c in row.split("|")[1:4])
        if layer:
            layers.append(layer)
        for path in re.findall(r"`([\w/]+(?:\.py|/))`", modules):
            if path.endswith("/") and not (PACKAGE / path / "__init__.py").is_file():
                continue  # a folder of data (model_configs/)
            # A package's row names its modules in what it holds: `replay.py` in `mitigations/`.
            names = ([f"finetune.{path.strip('/')}"] + [f"finetune.{path.strip('/')}.{m}"
                                                        for m in re.findall(r"`(\w+)\.py`", holds) if m != "__init__"]
                     if path.endswith("/") else [f"finetune.{path[:-3].replace('/', '.')}"])
            ranks.update(dict.fromkeys(names, len(layers) - 1))
    return ranks


def test_the_readme_code_map_lists_every_module_and_imports_point_down_its_layers():
    graph, ranks = _import_graph(), _code_map()
    packages = {"finetune", "finetune.__main__", "finetune.measure", "finetune.reports"}
    assert set(graph) - packages == set(ranks), "modules missing from, or only in, the README's code map"
    upward = [f"{m} -> {d}" for m in ranks for d in graph[m] if d in ranks and ranks[d] < ranks[m]]
    assert not upward, f"imports pointing up the code map's layers: {upward}"


HEAVY = ("torch", "transformers", "peft", "lm_eval", "accelerate")


def test_nothing_under_reports_imports_torch_or_the_measuring_half():
    """A folder rule: reports and comparisons run on a laptop, from report.json files alone."""
    reports = sorted((PACKAGE / "reports").glob("*.py"))
    assert len(reports) >= 4  # records, forgetting, report, compare
    for path in reports:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"
                assert not name.startswith(("..measure", "finetune.measure")), f"{path.name} imports {name}"
    modules = ", ".join(f"finetune.reports.{p.stem}" for p in reports if p.stem != "__init__")
    code = f"import sys, finetune.cli, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_checks_before_a_run_import_no_heavy_library_until_a_tokenizer_is_needed():
    """A recipe refused on its rows (a wrong format, a missing column) answers in a fraction of a second, before torch,
    transformers' model code or datasets are imported (seconds each)."""
    code = ("import sys, finetune.cli, finetune.preflight, finetune.formats; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {(*HEAVY, 'datasets')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_never_imports_the_post_hoc_commands():
    graph = _import_graph()
    reached, todo = set(), ["finetune.train"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert "finetune.mitigations" in reached and "finetune.mitigations.wise_ft" not in reached
    code = ("import sys, finetune.mitigations as m; m._modules(); "
            "print('finetune.mitigations.wise_ft' in sys.modules, 'finetune.mitigations.l2sp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_recipe_formats_and_suffixes_are_the_data_tables():
    assert set(typing.get_args(typing.get_type_hints(DatasetSpec)["format"])) == set(FORMATS)
    assert set(LOCAL_BUILDERS) == {".jsonl", ".json", ".csv", ".parquet", ".txt"}


def test_records_round_trip_through_json_by_their_fields():
    score = TaskScore(task="t", metric="acc", value=0.5, examples={"t/0": 1.0, "t/1": 0.0})
    record = Evaluation(step=3, tasks={"a.yaml": score}, targets={"b.yaml": score},
                        drift={"chat": Drift(kl=0.1, ci95=[0.05, 0.2], ppl_base=2.0, ppl_tuned=3.0, ppl_ratio=1.5,
                                             tokens=10, texts=2)})
    assert from_dict(Evaluation, json.loads(json.dumps(to_dict(record)))) == record
    assert from_dict(Evaluation, {"step": 0, "tasks": {}}) == Evaluation(step=0, tasks={})  # older JSON: defaults


MADE_UP = '''
import torch

def label(recipe):
    return "made-up pull"

def regularizer(recipe, ctx):
    return Pull([p for p in ctx.model.parameters() if p.requires_grad])

class Pull:
    name = "made_up"

    def __init__(self, params):
        self.params = params

    def apply(self):
        penalty = sum((p.detach() ** 2).sum() for p in self.params) * 1e-3
        for p in self.params:
            p.grad.add_(2e-3 * p.detach())
        return penalty
'''


def test_a_new_mitigation_is_its_module_alone(tmp_path, tiny_model, monkeypatch):
    """A module dropped into the mitigations package is found: its penalty is applied and logged, and its label
    names the run in reports, with no other file changed."""
    extra = tmp_path / "pkg"
    extra.mkdir()
    (extra / "made_up.py").write_text(MADE_UP)
    monkeypatch.setattr(mitigations, "__path__", [*mitigations.__path__, str(extra)])
    monkeypatch.delitem(sys.modules, "finetune.mitigations.made_up", raising=False)
    run_dir, _ = run(make_recipe(tmp_path, tiny_model, lora={"r": 4}), "train.max_steps=2")
    logged = metrics(run_dir)
    assert all(m["made_up"] > 0 for m in logged)
    assert mitigations.method_label(load_recipe(run_dir / "recipe.yaml")) == "LoRA r=4, lr 0.003, made-up pull"
