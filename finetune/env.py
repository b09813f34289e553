"""`finetune env`: what a bug report needs to know about this machine (versions, devices, accelerate's default
config, the environment variables that change behaviour), as `trl env` and `accelerate env` print it."""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("finetune", "torch", "transformers", "accelerate", "peft", "datasets", "lm_eval", "tokenizers",
            "safetensors", "huggingface_hub", "gguf", "trl", "deepspeed", "bitsandbytes")
VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_DATASETS_CACHE", "CUDA_VISIBLE_DEVICES",
             "OMP_NUM_THREADS", "FINETUNE_KEEP_FREED_MEMORY", "ACCELERATE_CONFIG_FILE")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _memory_gib() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "unknown"
    return f"{pages * size / 2**30:.1f} GiB"


def _devices() -> list[str]:
    import torch

    lines = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
        lines.append(f"CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("mps (Apple GPU)")
    return lines or ["none: training runs on the CPU"]


def _accelerate_config() -> list[str]:
    from accelerate.commands.config import default_config_file

    path = os.environ.get("ACCELERATE_CONFIG_FILE") or default_config_file
    if not os.path.isfile(path):
        return [f"no default config ({path}): `finetune train` runs one process; launch configs are in launch/"]
    with open(path, encoding="utf-8") as f:
        return [f"{path}:"] + [f"  {line.rstrip()}" for line in f if line.strip()]


# Made by scripts/lock.sh, installed by scripts/install.sh; present in a checkout, not in a plain `pip install`.
LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_status(lock: Path = LOCK) -> list[str]:
    """How the installed packages compare with the lock: one line if they match, else one per difference."""
    if not lock.is_file():
        return [f"no {lock.name} beside this install (not a checkout): versions are whatever pip chose"]
    pins = {_normal(m[1]): m[2] for line in lock.read_text(encoding="utf-8").splitlines() if (m := _PIN.match(line))}
    installed = {name: _version(name) for name in pins}
    differ = [f"  {name} {installed[name]} (lock: {pinned})" for name, pinned in sorted(pins.items())
              if installed[name] != pinned]
    if not differ:
        return [f"{lock}: every one of its {len(pins)} packages installed at its version"]
    return [f"{lock}: {len(differ)} of its {len(pins)} packages differ (`bash scripts/install.sh` restores it):"] \
        + differ


def report() -> str:
    lines = [f"finetune {_version('finetune')}", "",
             f"Python {platform.python_version()} ({sys.executable})",
             f"platform: {platform.platform()}",
             f"CPU cores: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
             f"memory: {_memory_gib()}", "", "packages:"]
    lines += [f"  {name:<16} {_version(name)}" for name in PACKAGES]
    lines += ["", "lock:"] + [f"  {line}" for line in lock_status()]
    lines += ["", "accelerators:"] + [f"  {d}" for d in _devices()]
    lines += ["", "accelerate default config:"] + [f"  {line}" for line in _accelerate_config()]
    lines += ["", "environment:"] + [f"  {v}={os.environ[v]}" for v in VARIABLES if v in os.environ] + \
        ([] if any(v in os.environ for v in VARIABLES) else ["  (none of " + ", ".join(VARIABLES[:4]) + ", ... set)"])
    return "\n".join(lines)
