"""Evaluation shared by the ranks of a launch (finetune/sharing.py): on the same weights, 2 ranks measure exactly what
one process measures, example by example, and each scores its share of the documents and drift texts. (The runs that
train and measure on 2 ranks are in test_distributed.py and test_fsdp.py.)"""

import json

import pytest
import torch
from conftest import ROOT, accelerate_launch, write_generation_task, write_task
from multiproc import LAUNCH, shares
from shared_eval_worker import measure

from finetune.measure.sharing import Ranks

WORKER = ROOT / "tests" / "shared_eval_worker.py"


def without_logs(tasks: dict) -> dict:
    return {spec: {k: v for k, v in score.items() if k != "log"} for spec, score in tasks.items()}


def sample_keys(tasks: dict) -> dict:
    return {spec: [(s["doc_id"], s["doc_hash"], s["prompt_hash"], s["filter"], [s[m] for m in s["metrics"]])
                   for leaf in score["log"].values() for s in leaf["samples"]] for spec, score in tasks.items()}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_measure_exactly_what_one_process_measures(tmp_path, base_dir, tiny_models, tasks):
    # A 2-shot task with randomly drawn shots: lm-eval's own rank split draws them per rank, in another order.
    fewshot = write_task(tmp_path / "tasks", "twoshot", 0)
    fewshot.write_text(fewshot.read_text() + "num_fewshot: 2\nfewshot_split: test\n")
    spec = {"base": str(base_dir), "tuned": str(tiny_models["llama"]), "limit": 7,  # 4 documents and 3 per task
            "tasks": [str(tasks["original"]), str(fewshot), str(write_generation_task(tmp_path / "gen"))]}
    one = measure({**spec, "cache": str(tmp_path / "cache-one")}, Ranks())
    two_spec = tmp_path / "two.json"
    two_spec.write_text(json.dumps({**spec, "cache": str(tmp_path / "cache-two"), "out": str(tmp_path / "two")}))
    proc = accelerate_launch("--config_file", str(LAUNCH / "cpu_ddp.yaml"), str(WORKER), str(two_spec))
    assert proc.returncode == 0, proc.stderr[-5000:]

    for rank in (0, 1):  # every rank ends with what one process measures: scores, answers, texts and drift
        two = json.loads((tmp_path / f"two.rank{rank}.json").read_text())
        assert two["texts"] == one["texts"]
        for point in ("base", "tuned"):
            assert without_logs(two[point]["tasks"]) == without_logs(one[point]["tasks"]), point
            # lm-eval's samples, kept for its layout: the same documents, prompts and per-example scores (the raw
            # log-likelihoods may differ in the last bits, as batches of other documents pad them differently).
            assert sample_keys(two[point]["tasks"]) == sample_keys(one[point]["tasks"]), point
        assert two["tuned"]["drift"] == one["tuned"]["drift"]  # float for float: per-text sums in text order
    assert one["tuned"]["drift"]["chat"]["kl"] > 0 and one["tuned"]["drift"]["text"]["kl"] > 0
    # The base's results cached by 2 ranks are the ones one process caches, under the same keys.
    cached = [{p.relative_to(tmp_path / f"cache-{n}"): json.loads(p.read_text())
               for p in (tmp_path / f"cache-{n}").rglob("*.json")} for n in ("one", "two")]
    assert cached[0].keys() == cached[1].keys() and len(cached[0]) == 5  # 3 tasks, 2 kinds of drift text
    scores = [{p: v for p, v in c.items() if p.parts[0] == "base_eval"} for c in cached]
    assert without_logs(scores[0]) == without_logs(scores[1]) and sample_keys(scores[0]) == sample_keys(scores[1])
    assert all(c[p] == cached[1][p] for c in cached[:1] for p in c if p.parts[0] == "drift")

    # The base's output-layer inputs on the drift texts, cached by 2 ranks as by one process, to the bit.
    inputs = [{p.relative_to(tmp_path / f"cache-{n}"): torch.load(p, weights_only=True)
               for p in (tmp_path / f"cache-{n}").rglob("*.pt")} for n in ("one", "two")]
    assert inputs[0].keys() == inputs[1].keys() and len(inputs[0]) == 2
    assert all(len(inputs[0][p]) == len(inputs[1][p]) == 100 for p in inputs[0])
    assert all((a is None and b is None) or torch.equal(a, b)
               for p in inputs[0] for a, b in zip(inputs[0][p], inputs[1][p]))

    # Shared: the base's requests (3 tasks of 7 documents: 11 and 10 documents per rank), its drift texts of each
    # kind (its output layer's inputs, once), then the tuned model's requests and drift texts, the drift in batches
    # made from all 100 texts and dealt out in turn.
    pieces = shares(proc.stdout)
    requests = [("loglikelihood requests", 14, [(28, 7), (28, 7)]), ("generate_until requests", 7, [(4, 4), (3, 3)])]
    assert [(p["what"], p["documents"], p["ranks"]) for p in pieces[:2] + pieces[4:6]] == requests * 2
    drift = pieces[2:4] + pieces[6:]
    assert [p["what"] for p in drift] == ["drift batches"] * 4, pieces
    assert all(p["total"] > 2 and [n for n, _ in p["ranks"]] == [(p["total"] + 1) // 2, p["total"] // 2]
               for p in drift), drift
