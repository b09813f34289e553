#!/usr/bin/env bash
# The main job: installs what is missing, then fine-tunes the tiny local model with LoRA and with full
# fine-tuning, and prints where each run wrote its model and metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
for recipe in tiny-lora tiny-full; do
  finetune train "recipes/$recipe.yaml" --new-run
done
