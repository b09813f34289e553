"""`finetune compare` on lm-eval's own sample logs: two models scored by the `lm_eval` CLI with --log_samples (the
tiny model and a copy with its weights disturbed), compared by finetune without torch, and checked against the
flips counted by hand from the sample files; every mismatch is one line naming the file and the task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.reports.forgetting import mcnemar_p, paired_interval

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 12

# Imports at exit: a comparison must run where torch is not installed.
NO_TORCH_AT_EXIT = """import atexit, runpy, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv = ["finetune", *sys.argv[1:]]
runpy.run_module("finetune", run_name="__main__")
"""


def lm_eval(model: Path, out: Path, tasks: Path, *options: str) -> Path:
    """The lm_eval CLI itself, with --log_samples, on CPU; returns --output_path."""
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model}", "--device", "cpu",
         "--batch_size", "8", "--include_path", str(tasks), "--log_samples", "--output_path", str(out), *options],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def compare(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH_AT_EXIT, "compare", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def logs(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """lm-eval output of the base, of a disturbed copy ("tuned") and of the base with another few-shot setting.
    The multiple-choice task also reports brier_score, whose per-example value is not 0/1."""
    root = tmp_path_factory.mktemp("lm_eval")
    tasks = root / "tasks"
    shutil.copytree(ROOT / "data" / "tasks", tasks)
    gk = tasks / "general_knowledge.yaml"
    gk.write_text(gk.read_text() + "  - {metric: brier_score, aggregation: brier_score, higher_is_better: false}\n")
    tuned = root / "tuned-model"
    shutil.copytree(tiny_model, tuned)
    weights = load_file(tuned / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    weights = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else v
               for k, v in weights.items()}
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    both = ("--tasks", "general_knowledge,instruction_following", "--limit", str(LIMIT))
    return {"base": lm_eval(tiny_model, root / "base", tasks, *both),
            "tuned": lm_eval(tuned, root / "tuned", tasks, *both),
            "one-shot": lm_eval(tiny_model, root / "one-shot", tasks, "--tasks", "general_knowledge", "--limit",
                                str(LIMIT), "--num_fewshot", "1")}


def samples(out: Path, task: str) -> dict[int, dict]:
    (path,) = out.glob(f"*/samples_{task}_*.jsonl")
    return {line["doc_id"]: line for line in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_compare_pairs_lm_eval_samples_and_its_numbers_match_a_count_by_hand(logs, tmp_path):
    proc = compare(logs["base"], logs["tuned"], "--tasks", "general_knowledge", "--target-tasks",
                   "instruction_following", "--max-drop", "0.05", "--out", tmp_path / "report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch imported: False" in proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "report.md").is_file()

    for task, kind, metric in [("general_knowledge", "tasks", "acc"), ("instruction_following", "targets",
                                                                       "exact_match")]:
        base, tuned = samples(logs["base"], task), samples(logs["tuned"], task)
        assert base.keys() == tuned.keys() and len(base) == LIMIT
        worse = sum(base[d][metric] == 1 and tuned[d][metric] == 0 for d in base)
        better = sum(base[d][metric] == 0 and tuned[d][metric] == 1 for d in base)
        got = report[kind][task]
        assert got["metric"] == metric and got["n"] == LIMIT
        assert got["flips"] == {"correct_to_wrong": worse, "wrong_to_correct": better}
        assert got["delta"] == pytest.approx((better - worse) / LIMIT)
        assert got["ci95"] == pytest.approx(paired_interval(worse, better, LIMIT))
        assert got["p_value"] == pytest.approx(mcnemar_p(worse, better))
        assert got["base"] == pytest.approx(sum(s[metric] for s in base.values()) / LIMIT)
    # The disturbance must have moved something, or the flips above prove nothing.
    assert sum(sum(report[k][t]["flips"].values()) for k, t in [("tasks", "general_knowledge"),
                                                               ("targets", "instruction_following")]) > 0
    gk = report["tasks"]["general_knowledge"]
    assert gk["chance"] == pytest.approx(0.25) and "acc_norm" in gk["other_metrics"]
    assert "brier_score" not in gk["other_metrics"]
    assert "not compared: general_knowledge: brier_score (none) is not 0 or 1 per example" in proc.stdout
    # lm-eval's unpaired test is shown beside ours, from the results' own standard errors.
    (a,), (b,) = ([json.loads(p.read_text())["results"]["general_knowledge"] for p in logs[k].glob("*/results_*")]
                  for k in ("base", "tuned"))
    z = (b["acc,none"] - a["acc,none"]) / (a["acc_stderr,none"] ** 2 + b["acc_stderr,none"] ** 2) ** 0.5
    assert report["unpaired"]["general_knowledge"]["z"] == pytest.approx(z)
    assert report["verdict"]["status"] in ("PASS", "FAIL", "INCONCLUSIVE") and "(--max-drop)" in \
        report["verdict"]["text"]
    # A forgotten example shows what each model answered: an option of the question.
    for example in gk["forgotten"]:
        doc = samples(logs["base"], "general_knowledge")[int(example["example"].split("/")[1])]["doc"]
        assert example["base"] in doc["choices"] and example["tuned"] in doc["choices"] and example["base"] != \
            example["tuned"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mismatched_or_incomplete_lm_eval_output_is_one_line_naming_the_file_and_task(logs, tmp_path):
    def refused(base, tuned, *options) -> str:
        proc = compare(base, tuned, *options, "--out", tmp_path / "never", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (tmp_path / "never").exists()
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("torch imported")]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        return lines[0]

    # Another few-shot setting: the same documents, different prompts.
    line = refused(logs["base"], logs["one-shot"], "--tasks", "general_knowledge")
    assert "task general_knowledge: the prompts differ on" in line and "num_fewshot 0 vs 1" in line

    # A task the other run did not score.
    line = refused(logs["base"], logs["one-shot"], "--tasks", "instruction_following")
    assert "task instruction_following: " in line and "has no result for it" in line and "results_" in line

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(logs["base"], dest)
        return dest

    # Fewer documents on one side (as with another --limit).
    short = copy("short")
    (path,) = short.glob("*/samples_general_knowledge_*.jsonl")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:LIMIT - 3]))
    line = refused(short, logs["tuned"], "--tasks", "general_knowledge")
    assert f"the base was scored on {LIMIT - 3} documents" in line and str(path) in line

    # Run without --log_samples: no samples file beside the results.
    bare = copy("bare")
    (path,) = bare.glob("*/samples_instruction_following_*.jsonl")
    path.unlink()
    line = refused(bare, logs["tuned"])
    assert "instruction_following" in line and path.name in line and "--log_samples" in line

    # Another lm-eval version's layout: a field this reader needs is missing.
    old = copy("old")
    (path,) = old.glob("*/samples_general_knowledge_*.jsonl")
    rows = [json.loads(text) for text in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "doc_hash"}) + "\n" for r in rows))
    line = refused(old, logs["tuned"], "--tasks", "general_knowledge")
    assert f"{path} line 1 has no doc_hash" in line and "lm_eval_version" in line

    # Nothing there, or two runs in one folder.
    assert "holds no lm-eval results" in refused(tmp_path, logs["tuned"])
    twice = copy("twice")
    (results,) = twice.glob("*/results_*.json")
    shutil.copy(results, results.with_name("results_2099-01-01T00-00-00.json"))
    assert "holds 2 lm-eval runs" in refused(twice, logs["tuned"])

    # A report folder that holds files is never written over.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    proc = compare(logs["base"], logs["tuned"], "--out", tmp_path / "taken", cwd=tmp_path)
    assert proc.returncode == 2 and "already holds files" in proc.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_finetune_eval_saves_lm_evals_layout_which_compare_reads_back_and_pairs_with_lm_evals_own(logs, tmp_path,
                                                                                                 tiny_model,
                                                                                                 monkeypatch):
    from finetune.cli import main as cli_main

    monkeypatch.setenv("HOME", str(tmp_path))  # the base-result cache (model.cache_dir's default) goes here
    tasks = logs["base"].parent / "tasks"
    tuned = logs["base"].parent / "tuned-model"
    out = tmp_path / "eval"
    assert cli_main(["eval", str(tiny_model), str(tuned), "--tasks", str(tasks / "general_knowledge.yaml"),
                     "--target-tasks", str(tasks / "instruction_following.yaml"), "--limit", str(LIMIT),
                     "--out", str(out)]) == 0
    ours = json.loads((out / "report.json").read_text())
    saved = {side: out / "lm-eval" / side for side in ("base", "tuned")}
    assert all(len(list(folder.glob("results_*.json"))) == 1 for folder in saved.values())

    # Read back by `finetune compare`, finetune's own evaluation gives finetune's own report.
    proc = compare(saved["base"], saved["tuned"], "--tasks", "general_knowledge", "--target-tasks",
                   "instruction_following", "--out", tmp_path / "again", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    for kind in ("tasks", "targets"):
        for task, record in ours[kind].items():
            assert {k: again[kind][task][k] for k in ("metric", "n", "flips", "delta", "ci95", "examples")} == \
                {k: record[k] for k in ("metric", "n", "flips", "delta", "ci95", "examples")}

    # And it pairs with a run of the lm_eval CLI on the same documents and prompts: lm-eval's base against ours.
    proc = compare(logs["base"], saved["base"], "--tasks", "general_knowledge", "--target-tasks",
                   "instruction_following", "--out", tmp_path / "across", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    across = json.loads((tmp_path / "across" / "report.json").read_text())
    # The same model scored by both tools: every log-likelihood choice the same, example by example.
    pairs = across["tasks"]["general_knowledge"]["examples"]
    assert len(pairs) == LIMIT and all(a == b for a, b in pairs.values())
