"""`eval.backend: vllm`: refused in one line where it cannot run, and, with lm-eval's vLLM model replaced by a stand-in
that loads what it is handed from disk as vLLM would (no GPU here), the weights finetune hands over are the model it
measures and the scores feed the same statistics as the in-memory path."""

import dataclasses
import importlib.util
import subprocess
import sys

import peft
import pytest
import torch
from conftest import write_generation_task, write_task
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM

import finetune.measure.vllm_backend as vllm_backend
from finetune.measure.evaluate import ForgettingEval
from finetune.model_files import load_tokenizer
from finetune.preflight import PreflightError, check_sources
from finetune.recipe import EvalSection, ModelSection, QuantizationSection


def test_vllm_is_refused_in_one_line_naming_what_is_missing(base_dir, tasks, monkeypatch):
    model = ModelSection(path=str(base_dir))
    section = EvalSection(tasks=[str(tasks["original"])], backend="vllm")
    check_sources(model, dataclasses.replace(section, backend="hf"))  # the default needs none of it
    real_find_spec = importlib.util.find_spec

    def refused(quantized=False) -> str:
        with pytest.raises(PreflightError) as e:
            check_sources(dataclasses.replace(model, quantization=QuantizationSection() if quantized else None),
                          section)
        assert "\n" not in str(e.value) and "eval.backend" in str(e.value)
        return str(e.value)

    assert importlib.util.find_spec("vllm") is None  # this suite's machine: no vLLM, no GPU
    assert "pip install vllm" in refused()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else
                        real_find_spec(name, *a))
    assert "needs a CUDA GPU" in refused()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "4-bit" in refused(quantized=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "one process" in refused() and "finetune eval" in refused()
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_sources(model, section)  # vLLM, a GPU, one process: nothing to refuse


def test_finetune_eval_with_vllm_says_so_in_one_line_before_loading_anything(base_dir, tasks, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune", "eval", str(base_dir), str(base_dir), "--tasks",
                           str(tasks["original"]), "--backend", "vllm", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "pip install vllm" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


class StandIn(HFLM):
    """What lm-eval's VLLM does with its arguments, on CPU: the model from `pretrained` (a folder on disk), the
    adapter from `lora_local_path`, the tokenizer from `tokenizer`."""

    made: list[dict] = []

    def __init__(self, pretrained: str, tokenizer: str, lora_local_path: str | None = None, max_lora_rank: int = 16,
                 gpu_memory_utilization: float = 0.9, batch_size="auto", dtype="auto", trust_remote_code=False):
        StandIn.made.append({"pretrained": pretrained, "lora": lora_local_path, "rank": max_lora_rank,
                             "memory": gpu_memory_utilization, "batch_size": batch_size})
        model = AutoModelForCausalLM.from_pretrained(pretrained)
        if lora_local_path:
            model = peft.PeftModel.from_pretrained(model, lora_local_path)
        from transformers import AutoTokenizer

        super().__init__(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer), batch_size=8)


@pytest.fixture()
def stand_in(monkeypatch):
    StandIn.made = []
    monkeypatch.setattr(vllm_backend, "lm_class", lambda: StandIn)
    monkeypatch.setattr(vllm_backend, "memory_share", lambda: 0.42)
    return StandIn


def nudged(model, seed: int):
    """`model` with every trainable weight moved: a tuned model that scores unlike its base."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_vllm_scores_the_weights_it_is_handed_as_the_in_memory_path_does(base_dir, tmp_path, stand_in, kind):
    section = ModelSection(path=str(base_dir), cache_dir=str(tmp_path / "cache"))
    tokenizer = load_tokenizer(section)
    tuned = AutoModelForCausalLM.from_pretrained(base_dir)
    if kind == "lora":
        tuned = peft.get_peft_model(tuned, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tuned = nudged(tuned, 1)
    task_files = [str(write_task(tmp_path / "mc", "original", 0)), str(write_generation_task(tmp_path / "gen"))]
    # lm-eval's own path (share_prefixes off) in float32 (the stand-in has no autocast; `auto` would pick bf16 for
    # the in-memory path on an AVX512-BF16 or AMX CPU), so both backends compute each score the same way.
    evals = {backend: ForgettingEval(EvalSection(tasks=task_files, limit=8, backend=backend, share_prefixes=False,
                                                 mixed_precision="no",
                                                 drift_texts=[str(write_texts(tmp_path))]), section, tokenizer)
             for backend in ("vllm", "hf")}
    measured = {}
    for backend, fe in evals.items():
        base = fe.evaluate_base(tuned if kind == "lora" else None)
        measured[backend] = base, fe.evaluate(tuned, step=1)
    # Two constructions: the base from its folder, then the tuned model from what was saved aside.
    assert [m["pretrained"] for m in stand_in.made][0] == str(base_dir.absolute())
    assert [m["lora"] is not None for m in stand_in.made] == [False, kind == "lora"]
    if kind == "full":
        assert stand_in.made[1]["pretrained"] != stand_in.made[0]["pretrained"]
    assert {m["memory"] for m in stand_in.made} == {0.42} and {m["batch_size"] for m in stand_in.made} == {"auto"}
    (base_v, tuned_v), (base_h, tuned_h) = measured["vllm"], measured["hf"]
    for spec in task_files:
        assert base_v.tasks[spec].examples == base_h.tasks[spec].examples
        assert tuned_v.tasks[spec].examples == tuned_h.tasks[spec].examples
        assert tuned_v.tasks[spec].answers == tuned_h.tasks[spec].answers
    assert tuned_v.drift["text"].kl == tuned_h.drift["text"].kl > 0  # the drift is transformers' either way
    # The weights handed over were the tuned ones: they score unlike the base's, as the in-memory model does.
    mc = task_files[0]
    assert log_likelihoods(tuned_v, mc) != log_likelihoods(base_v, mc)
    assert log_likelihoods(tuned_v, mc) == pytest.approx(log_likelihoods(tuned_h, mc), abs=1e-5)
    # The base's scores by vLLM and by the in-memory model are cached apart: the hf evaluation measured it again.
    assert len(list((tmp_path / "cache" / "base_eval").glob("*.json"))) == 2 * len(task_files)
    assert evals["vllm"].precision.startswith("tasks scored by lm-eval's vllm model")


def log_likelihoods(evaluation, spec: str) -> list[float]:
    """Every option's log-likelihood, in lm-eval's log of the task."""
    (leaf,) = evaluation.tasks[spec].log
    return [float(option[0][0]) for s in evaluation.tasks[spec].log[leaf]["samples"] for option in s["resps"]]


def write_texts(tmp_path):
    path = tmp_path / "drift.txt"
    path.write_text("the cat sat on the mat\nthe dog ran in the park\n")
    return path
