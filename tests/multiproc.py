"""Starting finetune under `accelerate launch` from the engine and multi-node tests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_close, make_recipe, metrics, run, weights, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
ENGINE_WORKER = ROOT / "tests" / "engine_worker.py"
DIST_WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT_S = 300
FSDP_SEEN = "engine-check: FSDP fsdp_version=2 all parameters DTensor=True"  # tests/engine_worker.py's line


# `accelerate launch` with torch's standalone rendezvous: it binds port 0 itself and keeps it, so launches running at
# the same time cannot collide (accelerate's --main_process_port 0 binds a port, closes it and passes the number on).
_STANDALONE_LAUNCH = """import sys
from accelerate.commands.launch import launch_command, launch_command_parser
args = launch_command_parser().parse_args(sys.argv[1:])
args.standalone = True
launch_command(args)
"""


def free_port() -> int:
    """A port agreed in advance by the launchers of several "machines", which standalone mode cannot give: bound and
    released here, so another process could take it in between (a failed test, never a wrong result)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`accelerate launch ARGS` on this one machine, standalone, in a session of its own (so a hung launch can be
    killed with all its ranks)."""
    return subprocess.Popen([sys.executable, "-c", _STANDALONE_LAUNCH, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def accelerate_launch(config: Path, *args: str, port: int | None = None, env: dict | None = None,
                      **launch_options) -> subprocess.Popen:
    """`accelerate launch --config_file CONFIG [--option value ...] ARGS`. Options override the config file's, e.g.
    num_processes=2, mixed_precision="no" (CPU runs are fp32). One machine: standalone; several (num_machines > 1):
    the given rendezvous port."""
    options = [item for key, value in launch_options.items() for item in (f"--{key}", str(value))]
    if launch_options.get("num_machines", 1) == 1:
        return launch("--config_file", str(config), *options, *args, env=env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(port or free_port()), *options]
    return subprocess.Popen([*cmd, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, proc.args))} hung for {timeout} s:\n{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_engine(config: Path, recipe: Path, *overrides: str, env: dict | None = None,
               num_processes: int = 2, worker: Path = ENGINE_WORKER) -> subprocess.CompletedProcess:
    """`finetune train RECIPE` on 2 CPU processes under the FSDP or DeepSpeed config, through tests/engine_worker.py
    (which asserts that accelerate really set that engine up); under DDP (launch/cpu_ddp.yaml) through
    worker=DIST_WORKER."""
    proc = accelerate_launch(config, str(worker), str(recipe), *overrides, env=env,
                             num_processes=num_processes, mixed_precision="no")
    return finish(proc)


# finetune/sharing.py's debug line, which the workers print: what one rank evaluated of what all ranks did.
SHARE = re.compile(r"^rank (\d+) of (\d+): (\d+) of (\d+) ([\w ]+?)(?: \((\d+) of (\d+) documents\))?$", re.M)


def shares(output: str, world: int = 2) -> list[dict]:
    """Each piece of work the ranks shared, in order (lm-eval's requests of one evaluation, one kind of drift texts):
    {"what", "total", "documents", "ranks": [(items, documents) each rank took]}, checked whole: every rank logged
    the same pieces, in the same order, and their shares add up to all of it."""
    by_rank: dict[int, list] = {}
    for rank, of, n, total, what, docs, all_docs in SHARE.findall(output):
        assert int(of) == world, (rank, of)
        by_rank.setdefault(int(rank), []).append((what, int(total), int(all_docs or total), int(n), int(docs or n)))
    assert sorted(by_rank) == list(range(world)), sorted(by_rank)
    pieces = []
    for lines in zip(*(by_rank[r] for r in range(world)), strict=True):
        what, total, documents = lines[0][:3]
        assert all(line[:3] == (what, total, documents) for line in lines), lines
        ranks = [line[3:] for line in lines]
        assert sum(n for n, _ in ranks) == total and sum(d for _, d in ranks) == documents, lines
        pieces.append({"what": what, "total": total, "documents": documents, "ranks": ranks})
    return pieces


# ---------------------------------------------------------------- comparing a launched run with one process


def validation_file(tmp_path) -> Path:
    """5 examples, unpacked: 3 on rank 0 and 2 on rank 1, so one rank runs a padded forward."""
    rows = [{"messages": [{"role": "user", "content": f"count from {w}"},
                          {"role": "assistant", "content": f"{w} and on, {'and on ' * i}"}]}
            for i, w in enumerate(["one", "two", "three", "four", "five"])]
    return write_jsonl(tmp_path / "val.jsonl", rows)


def two_ranks(tmp_path, model_dir, name, **sections):
    """(1-process recipe with batch 4, 2-process recipe with batch 2): the same global batch."""
    train = {"max_steps": 6, "lr": 3e-3, "warmup_steps": 1, "max_grad_norm": 0.5, **sections.pop("train", {})}
    one = make_recipe(tmp_path, model_dir, f"{name}-one", **sections, train={**train, "batch_size": 4})
    two = make_recipe(tmp_path, model_dir, f"{name}-two", **sections, train={**train, "batch_size": 2})
    return one, two


def assert_same_run(one_dir: Path, two_dir: Path, keys=("loss", "grad_norm")):
    for a, b in zip(metrics(one_dir), metrics(two_dir), strict=True):
        assert a["target_tokens"] == b["target_tokens"], (a, b)
        for key in keys:
            assert (key in a) == (key in b), (key, a, b)
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-5, (key, a, b)
    assert_close(weights(one_dir), weights(two_dir), atol=1e-5)


def assert_forgetting_measured_as_in_one_process(tmp_path, base_dir, tasks, config: Path, seen: str,
                                                 worker: Path = ENGINE_WORKER):
    """A run that forgets, measured every 2 updates on 2 ranks under `config` and on one process: the same curve,
    each rank having scored half of the documents and drift texts."""
    data = write_jsonl(tmp_path / "conflict.jsonl",
                       [{"text": f"Q: what is {x}? A: two"} for x in "abcdefghijklmnop"])
    sections = dict(model={"cache_dir": str(tmp_path / "cache")},
                    data={"train": [{"path": str(data), "format": "text"}], "packing": False},
                    # float32: the claim is sharding's exactness. Under bf16 autocast (`auto` picks it on CPUs with
                    # AVX512-BF16 or AMX) a rank's batch shapes change the kernels' rounding: the drift KL moved by
                    # 1.4e-5 of itself on an AVX512-BF16 CPU, past the 1e-5 below.
                    eval={"tasks": [str(tasks["original"])], "target_tasks": [str(tasks["conflict"])], "every": 2,
                          "max_drop": 0.05, "limit": 8, "mixed_precision": "no"})
    train = {"max_steps": 4, "lr": 3e-3}
    one = make_recipe(tmp_path, base_dir, "eval-one", **sections, train={**train, "batch_size": 8})
    two = make_recipe(tmp_path, base_dir, "eval-two", **sections, train={**train, "batch_size": 4})
    one_dir, _ = run(one)
    proc = run_engine(config, two, worker=worker)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert seen in proc.stdout
    two_dir = one_dir.parent / "eval-two"
    # The base's scores and texts come from the cache the one-process run wrote; steps 2 and 4 are shared: each
    # rank scored the requests of 8 of the 16 documents (8 per task) and half of each kind's drift batches.
    pieces = shares(proc.stdout)
    assert [p["what"] for p in pieces] == ["loglikelihood requests", "drift batches", "drift batches"] * 2, pieces
    for piece in pieces:  # drift texts go in batches made from all of them, dealt out in turn
        total = 16 if piece["what"] == "loglikelihood requests" else piece["total"]
        assert piece["documents"] == total and [d for _, d in piece["ranks"]] == [(total + 1) // 2, total // 2], piece
    reports = [json.loads((d / "forgetting" / "report.json").read_text()) for d in (one_dir, two_dir)]
    assert [p["step"] for p in reports[1]["curve"]] == [0, 2, 4]
    # Example by example, from the curve each run kept (step 2 mid-run, step 4 the last).
    curves = [[json.loads(line) for line in (d / "forgetting" / "curve.jsonl").read_text().splitlines()]
              for d in (one_dir, two_dir)]
    for a, b in zip(*curves, strict=True):
        assert a["step"] == b["step"] and a["tasks"] == b["tasks"] and a["targets"] == b["targets"]
        assert a["drift"].keys() == b["drift"].keys() and a["drift"]
        for kind in a["drift"]:
            assert abs(a["drift"][kind]["kl"] - b["drift"][kind]["kl"]) < 1e-5, (kind, a["drift"], b["drift"])
    assert reports[1]["tasks"]["original"]["delta"] < 0  # the run forgot: equal curves of unchanged scores prove little
