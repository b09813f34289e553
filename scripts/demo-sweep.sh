#!/usr/bin/env bash
# After scripts/demo.sh: does LoRA at a low learning rate forget less than full fine-tuning, at matched learning?
# (README, "Does LoRA at a low learning rate forget less?"). The demo's data and 60 updates, SmolLM2-135M-Instruct:
#   - LoRA (r 16) at 1e-4, 3e-4, 1e-3 (the demo's own run) and 3e-3; full fine-tuning at 5e-6, 1e-5, 3e-5, 5e-5 and
#     1e-4, each through `finetune sweep` (5e-5 is recipes/demo-full.yaml's own rate: runs/demo-full);
#   - a second training seed for the LoRA and full runs nearest to equal new-task gain;
#   - LoRA at its best rate within the budget, or else its lowest rate that still learns the task, with replay of
#     general chat rows (at 1e-3 this is the demo's runs/demo-lora-replay, reused);
# then every run on one learning-forgetting plane: runs/demo-sweep/compare.{md,html}. The base evaluation is the
# one scripts/demo.sh cached. Finished runs are reused, so a rerun only prints the comparison again.
#
# With --prune, the same runs are forecast from bench/forecast/runs.jsonl as they train, and a run whose forecast is
# FAIL beyond doubt stops there and is measured there, marked on the plane: the sweeps' runs are pruned by their
# Optuna study (`finetune sweep --prune`), the others stop on `eval.on_over_budget: stop`. They go to
# runs/demo-sweep-pruned/ (the plane there too), apart from the runs trained to their end; the demo's own
# runs/demo-lora is reused by both.
#
#   bash scripts/demo-sweep.sh           # about 36 minutes on 2 CPU cores
#   bash scripts/demo-sweep.sh --prune   # the same question, runs that will fail stopped early: about 26
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") out=runs/demo-sweep; at=runs; cut=(); stop=() ;;
  --prune) out=runs/demo-sweep-pruned; at=$out; cut=(--prune); stop=(eval.on_over_budget=stop)
           stop+=(eval.forecast_calibration=bench/forecast/runs.jsonl) ;;
  *) echo "usage: bash scripts/demo-sweep.sh [--prune]" >&2; exit 2 ;;
esac
bash scripts/install.sh
. .venv/bin/activate
[ -f runs/demo-lora/final/adapter_config.json ] || bash scripts/demo.sh

echo "== LoRA r 16 at three more learning rates (1e-3 is the demo's runs/demo-lora)"
finetune sweep recipes/demo-lora.yaml "output.dir=$at/demo-lora" "${stop[@]:1}" "${cut[@]}" \
  --grid train.lr=1e-4,3e-4,3e-3
echo "== full fine-tuning at its recipe's rate (5e-5) and four more"
finetune train recipes/demo-full.yaml "${stop[@]}" "output.dir=$at/demo-full"
finetune sweep recipes/demo-full.yaml "output.dir=$at/demo-full" "${stop[@]:1}" "${cut[@]}" \
  --grid train.lr=5e-6,1e-5,3e-5,1e-4

runs=(runs/demo-lora "$at"/demo-lora-sweep/lr={1e-4,3e-4,3e-3} "$at/demo-full"
      "$at"/demo-full-sweep/lr={5e-6,1e-5,3e-5,1e-4})
finetune report "${runs[@]}" --out "$out/first" >/dev/null
# The LoRA and full runs nearest in new-task gain, as the comparison paired them, get a second training seed. LoRA's
# best run within the budget, or else its lowest rate that still learns the new task (gain within 0.1 of LoRA's
# best), is run again with replay. Runs stopped on their forecast were measured part-trained: their gain is not
# their rate's, so they are neither paired (the comparison leaves them out) nor picked here.
read -r lora_lr full_lr replay_lr < <(python - "$out/first/compare.json" <<'PY'
import json, sys, yaml
from finetune.reports.compare import part_trained
compare = json.load(open(sys.argv[1]))
rate = lambda run: float(yaml.safe_load(open(f"{run}/recipe.yaml"))["train"]["lr"])
short = lambda x: f"{x:.0e}".replace("e-0", "e-")  # 3e-4, as the sweep named its folders
pairs = compare["method_comparison"]
pair = {("lora" if yaml.safe_load(open(f"{run}/recipe.yaml")).get("lora") else "full"): rate(run)
        for run in (pairs[0]["runs"] if pairs else [])}
lora = [r for r in compare["runs"] if r["family"] != "full" and not part_trained(r)]
passing = [r for r in lora if r["status"] == "PASS"]
learns = [r for r in lora if r["gain"] >= max(r["gain"] for r in lora) - 0.1]
best = max(passing, key=lambda r: r["gain"]) if passing else min(learns, key=lambda r: rate(r["run"]))
print(*(short(pair[f]) if f in pair else "-" for f in ("lora", "full")), short(rate(best["run"])))
PY
)
seeds=()
if [ "$lora_lr" = - ]; then
  echo "== no second training seed: no LoRA and full runs trained to their end to pair at matched gain"
else
  echo "== a second training seed at matched gain: LoRA lr $lora_lr, full lr $full_lr"
  seeds=("$at/demo-lora-sweep/lr=${lora_lr}_seed=1" "$at/demo-full-sweep/lr=${full_lr}_seed=1")
  finetune train recipes/demo-lora.yaml "train.lr=$lora_lr" train.seed=1 "${stop[@]}" "output.dir=${seeds[0]}"
  finetune train recipes/demo-full.yaml "train.lr=$full_lr" train.seed=1 "${stop[@]}" "output.dir=${seeds[1]}"
fi
echo "== LoRA at lr $replay_lr with 5% of training tokens from general chat rows"
replay="$at/demo-lora-sweep/lr=${replay_lr}_replay"
# The demo's own rate, trained to its end: the same run as scripts/demo-plane.sh's.
[ "$replay_lr" = 1e-3 ] && [ -z "${cut[*]}" ] && replay=runs/demo-lora-replay
finetune train recipes/demo-lora.yaml "train.lr=$replay_lr" "${stop[@]}" "output.dir=$replay" \
  'data.replay={datasets: [{path: data/general/self_replay.jsonl, format: chat}], ratio: 0.05}'
echo
finetune report "${runs[@]}" "${seeds[@]}" "$replay" --out "$out"
