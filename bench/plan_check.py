"""Checks `finetune plan` against memory measured on CPU: finetune trains the benchmark's shapes (bench/throughput.py:
its chat rows, batch 8 x 256 tokens, fp32, one thread) and this script prints, for each run, the plan's peak beside

- the peak of live tensor bytes, from torch's profiler (every CPU allocation and free from the first step on, plus
  the weights and buffers already there): what the plan counts;
- the process's peak resident memory (ru_maxrss, as the benchmark reports it, from runs without the profiler) and
  its resident memory just before the model loaded (Python, torch, transformers, datasets, the tokenizer: the
  process baseline). RSS also holds what the allocator keeps. On CPU finetune keeps glibc's freed memory mapped
  (finetune/cpu.py); a third run leaves glibc at its defaults (FINETUNE_KEEP_FREED_MEMORY=0), and a fourth also maps
  every block above 1 MB apart (MALLOC_MMAP_THRESHOLD_=1048576), so that freed blocks go back to the OS and leave no
  holes in the heap: its RSS is the baseline plus live memory, nearly.

    python bench/plan_check.py                     # tiny and SmolLM2-135M, LoRA and full: about 30 minutes on 2 cores
    python bench/plan_check.py --models tiny       # a few minutes
    python bench/plan_check.py --models tiny --modes qlora --overrides model.gradient_checkpointing=true

Every run is a process of its own, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import throughput  # noqa: E402  (the benchmark's data, models and recipe)

GiB = 2**30


def rss_now() -> int:
    """Resident bytes of this process now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_tensor_bytes(events, before: int) -> int:
    """Largest sum of live CPU tensor bytes over a profile's allocation events, on top of `before`."""
    import torch

    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return before + peak


def measure(recipe, profile: bool = True) -> dict:
    """Train `recipe` in this process; the peak of live tensor bytes from the first step on (with `profile`), the RSS
    before the model loaded, and the peak RSS. The profiler's own allocations interleave with training's and change
    how the heap fragments, so RSS is measured in runs without it."""
    import torch

    import finetune.train
    from finetune.checkpoint import open_run_dir

    state: dict = {}
    step, load = finetune.train.train_step, finetune.train.load_model

    def loading(*args, **kwargs):
        state["baseline_rss"] = rss_now()
        return load(*args, **kwargs)

    def profiled_step(accelerator, model, *args, **kwargs):
        if profile and "profile" not in state:  # weights and buffers exist; gradients and AdamW's states not yet
            unwrapped = accelerator.unwrap_model(model)
            state["before"] = sum(t.untyped_storage().nbytes() for t in
                                  {id(t): t for t in [*unwrapped.parameters(), *unwrapped.buffers()]}.values())
            state["profile"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                      profile_memory=True)
            state["profile"].start()
        return step(accelerator, model, *args, **kwargs)

    finetune.train.train_step, finetune.train.load_model = profiled_step, loading
    try:
        finetune.train.train(recipe, open_run_dir(recipe, accept_changes=False))
    finally:
        finetune.train.train_step, finetune.train.load_model = step, load
    out = {"baseline_rss": state["baseline_rss"], "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if profile:
        state["profile"].stop()
        out["tensors"] = peak_tensor_bytes(state["profile"].profiler.kineto_results.events(), state["before"])
    return out


def planned(recipe) -> float:
    from finetune.plan import estimate, load_layout, read_launch

    return estimate(load_layout(recipe.model), recipe, read_launch(None, 1), "one device",
                    recipe.model.gradient_checkpointing).peak


def bench_recipe(model: str, mode: str, tmp: Path, overrides: list[str], steps: int):
    """The benchmark's recipe for `model` (LoRA r 16 or full; QLoRA = LoRA on the 4-bit base) plus overrides."""
    from finetune.recipe import load_recipe

    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in throughput.chat_rows(256, seed=0)))
    c = dict(model=model, data=str(data), max_length=256, lr=1e-4, steps=steps, batch_size=8, cuda=False, bf16=False,
             mode="full" if mode == "full" else "lora")
    recipe = throughput.finetune_recipe(c, tmp)
    if mode == "qlora":
        overrides = ["model.quantization={bits: 4}", *overrides]
    return load_recipe(tmp / "recipe.yaml", overrides) if overrides else recipe


def worker(c: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = bench_recipe(c["model"], c["mode"], Path(tmp), c["overrides"], c["steps"])
        out = measure(recipe, c.get("profile", True))
        out["plan"] = planned(recipe)
    return out


def spawn(c: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(c)], capture_output=True, text=True,
                          env=dict(throughput.ENV, OMP_NUM_THREADS="1", **env), cwd=ROOT)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        raise RuntimeError(f"{c['mode']} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(result[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,135m")
    p.add_argument("--modes", default="lora,full", help="comma-separated: lora, full, qlora")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (the peak comes from the second on)")
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for every run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    lines = ["| model | mode | plan GiB | tensors GiB (profiler) | plan error | RSS before the model GiB | "
             "plan + RSS before GiB | peak RSS GiB: finetune's default / glibc's / blocks > 1 MB mapped apart | "
             "error vs peak RSS (same order) |", "|---" * 9 + "|"]
    glibc = {"FINETUNE_KEEP_FREED_MEMORY": "0"}
    apart = dict(glibc, MALLOC_MMAP_THRESHOLD_="1048576")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in throughput.model_dirs(Path(tmp), args.models.split(",")).items():
            for mode in args.modes.split(","):
                c = dict(model=model, mode=mode, overrides=args.overrides, steps=args.steps)
                # The profiler's run gives the tensors; plain runs give RSS as the benchmark measures it.
                tensors = spawn(dict(c, profile=True), {})
                runs = [spawn(dict(c, profile=False), env) for env in ({}, glibc, apart)]
                plan, base = runs[0]["plan"], runs[0]["baseline_rss"]
                lines.append(f"| {name} | {mode} | {plan / GiB:.3f} | {tensors['tensors'] / GiB:.3f} | "
                             f"{plan / tensors['tensors'] - 1:+.1%} | {base / GiB:.2f} | {(plan + base) / GiB:.2f} | "
                             + " / ".join(f"{r['peak_rss'] / GiB:.2f}" for r in runs) + " | "
                             + " / ".join(f"{(plan + base) / r['peak_rss'] - 1:+.0%}" for r in runs) + " |")
                print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
