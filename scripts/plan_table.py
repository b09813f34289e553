"""The README's "Will it fit?" table: `finetune plan` for Llama-3.1 8B and 70B, LoRA / QLoRA / full fine-tuning, under
DDP, FSDP and ZeRO-3 on 8 GPUs of 80 GB, all at one shape: 4 rows of 2048 tokens per GPU and micro-step, 4 micro-steps
per update (128 rows), bf16 autocast, gradient checkpointing. Offline, from the shipped configs.

    python scripts/plan_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.plan import GiB, estimate, load_layout, read_launch, usable_bytes  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402

MODELS = {"Llama-3.1-8B": "meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-70B": "meta-llama/Llama-3.1-70B-Instruct"}
METHODS = {"LoRA r 16": ("llama3.1-8b-lora-alpaca.yaml", []),
           "QLoRA r 16": ("llama3.1-8b-qlora-1gpu.yaml", []),
           "full": ("llama3.1-8b-lora-alpaca.yaml", ["lora=null"])}
SHAPE = ["train.batch_size=4", "data.max_length=2048", "train.grad_accum=4", "train.mixed_precision=bf16",
         "model.gradient_checkpointing=true"]
ENGINES = {"DDP": "multi_gpu_ddp.yaml", "FSDP": "fsdp.yaml", "ZeRO-3": "deepspeed_zero3.yaml"}
GPU_GIB = 80


def main() -> int:
    lines = ["| model | method | trainable | DDP | FSDP | ZeRO-3 | GiB sent per update (DDP / FSDP / ZeRO-3) |",
             "|---|---|---:|---|---|---|---|"]
    for model_name, hub_id in MODELS.items():
        for method, (recipe_file, overrides) in METHODS.items():
            recipe = load_recipe(ROOT / "recipes" / recipe_file, [f"model.path={hub_id}", *overrides, *SHAPE])
            layout = load_layout(recipe.model)
            cells, sent = [], []
            for engine, launch_file in ENGINES.items():
                launch = read_launch(ROOT / "launch" / launch_file, None)
                est = estimate(layout, recipe, launch, engine, checkpointing=True)
                if not est.supported:
                    cells.append("n/a")
                    sent.append("-")
                    continue
                verdict = "fits" if est.peak <= usable_bytes(GPU_GIB) else "**does not fit**"
                cells.append(f"{est.peak / GiB:,.1f} GiB, {verdict}")
                sent.append(f"{est.sent / GiB:,.1f}")
            lines.append(f"| {model_name} | {method} | {est.trainable / 1e6:,.0f}M | " + " | ".join(cells)
                         + f" | {' / '.join(sent)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
