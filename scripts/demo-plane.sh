#!/usr/bin/env bash
# After scripts/demo.sh: the demo's LoRA run again with each way of forgetting less, then every run on one
# learning-forgetting plane (README, "Limiting forgetting"). About an hour on 2 CPU cores with the 420-item suites;
# finished runs are reused.
#
#   bash scripts/demo-plane.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
[ -f runs/demo-lora/final/adapter_config.json ] || bash scripts/demo.sh
finetune train recipes/demo-full.yaml  # full fine-tuning beside them (made by scripts/demo-sweep.sh, else here)

echo "== replay: 5% of training tokens from general chat rows (data/general/self_replay.jsonl)"
finetune train recipes/demo-lora.yaml output.dir=runs/demo-lora-replay \
  'data.replay={datasets: [{path: data/general/self_replay.jsonl, format: chat}], ratio: 0.05}'
echo "== L2-SP: pull the adapter's update toward zero"
finetune train recipes/demo-lora.yaml output.dir=runs/demo-lora-l2sp-0.1 train.l2sp=0.1
echo "== EWC: the same pull, weighted by the base model's Fisher on the general rows"
finetune train recipes/demo-lora.yaml output.dir=runs/demo-lora-ewc train.l2sp=0.1 \
  'train.l2sp_fisher={datasets: [{path: data/general/self_replay.jsonl, format: chat}], rows: 64}'
echo "== KL to the base: stay close to the base's next-token predictions on 4 general chat rows per update"
finetune train recipes/demo-lora.yaml output.dir=runs/demo-lora-kl \
  'train.kl_to_base={weight: 1, datasets: [{path: data/general/self_replay.jsonl, format: chat}], rows_per_step: 4}'
echo "== the answer format protected (recipes/demo-lora-format.yaml, made by scripts/demo.sh), and its parts alone"
finetune train recipes/demo-lora-format.yaml output.dir=runs/demo-lora-format
finetune train recipes/demo-lora-format.yaml output.dir=runs/demo-lora-system data.replay=null train.kl_to_base=null
finetune train recipes/demo-lora-format.yaml output.dir=runs/demo-lora-format-replay train.kl_to_base=null
finetune train recipes/demo-lora-format.yaml output.dir=runs/demo-lora-format-kl-all train.kl_to_base.first_tokens=null
echo "== WiSE-FT: the LoRA run's adapter scaled by alpha"
[ -d runs/demo-lora/interpolation/alpha-0.5 ] || finetune interpolate runs/demo-lora --alphas 0.5
echo
finetune report runs/demo-lora runs/demo-full runs/demo-lora-replay runs/demo-lora-l2sp-0.1 runs/demo-lora-ewc runs/demo-lora-kl \
  runs/demo-lora-format runs/demo-lora-system runs/demo-lora-format-replay runs/demo-lora-format-kl-all \
  runs/demo-lora/interpolation/alpha-* --out runs/demo-plane
