"""Which precision to compute in, chosen by what the hardware does fast.

bf16 is only a speed-up where the hardware multiplies in it: GPUs with bf16 units, and CPUs with AMX or AVX512-BF16
(measured on a CPU with AMX, 2 threads: a 2048x576 @ 576x1536 matmul at 2,073 GFLOP/s in bf16 against 281 in
float32). Elsewhere torch emulates it, and a bf16 forward pass can be several times slower than float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # as /proc/cpuinfo and lscpu name them


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether bf16 matmuls are faster than float32 on `device`, why, in a few words)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} computes in bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no bf16 units"
    if device.type == "cpu":
        has = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
        if has:
            return True, f"this CPU has {' and '.join(has)}"
        return False, "this CPU has neither AMX nor AVX512-BF16, so bf16 would be slower than float32"
    return False, f"bf16 is not chosen automatically on {device.type}"


def eval_autocast(setting: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of evaluation forward passes (None: the model's own dtype) for `eval.mixed_precision`, and
    what was chosen and why, in a few words."""
    if setting == "no":
        return None, "no autocast (eval.mixed_precision: no)"
    fast, why = fast_bf16(device)
    if setting == "bf16":
        return torch.bfloat16, "bf16 autocast (eval.mixed_precision: bf16)" + ("" if fast else f"; note: {why}")
    if fast:
        return torch.bfloat16, f"bf16 autocast: {why} (eval.mixed_precision: no turns it off)"
    return None, f"no autocast: {why}"


@contextmanager
def cast_once(dtype: torch.dtype | None, model: torch.nn.Module | None) -> Iterator[None]:
    """One autocast region to `dtype` around a whole evaluation on the CPU, in which every float weight of `model` is
    cast once. Autocast keeps its cast copy of a weight that requires grad until its outermost region ends, but casts a
    frozen weight again at each use: the base weights of a LoRA model were cast to bf16 at every forward pass, ~40 ms
    of each of SmolLM2-135M's on 2 CPU cores (a decoding step of 32 rows took 120 ms instead of 67). So frozen weights
    are marked as requiring grad for the duration (under no_grad nothing is recorded) and put back after; the casts
    are the same, so are the results. On a GPU the copies would cost memory that training did not need (half the
    size of a float32 base), and the casts are cheap there: nothing changes."""
    if dtype is None or model is None or next(model.parameters()).device.type != "cpu":
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    with torch.autocast("cpu", dtype=dtype):
        for p in frozen:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(False)
