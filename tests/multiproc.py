"""Starting finetune under `accelerate launch` from the engine and multi-node tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
ENGINE_WORKER = ROOT / "tests" / "engine_worker.py"
TIMEOUT_S = 300


def free_port() -> int:
    """A port for one launch's rendezvous (the only place the tests here choose one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: Path, *args: str, port: int | None = None, env: dict | None = None,
                      **launch_options) -> subprocess.Popen:
    """`accelerate launch --config_file CONFIG [--option value ...] ARGS` in a session of its own (so a hung launch
    can be killed with all its ranks). Options override the config file's, e.g. num_processes=2,
    mixed_precision="no" (CPU runs are fp32)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(port or free_port())]
    for key, value in launch_options.items():
        cmd += [f"--{key}", str(value)]
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
               num_processes: int = 2) -> subprocess.CompletedProcess:
    """`finetune train RECIPE` on 2 CPU processes under the FSDP or DeepSpeed config, through tests/engine_worker.py
    (which asserts that accelerate really set that engine up)."""
    proc = accelerate_launch(config, str(ENGINE_WORKER), str(recipe), *overrides, env=env,
                             num_processes=num_processes, mixed_precision="no")
    return finish(proc)
