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
#   bash scripts/demo-sweep.sh      # about 45 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
[ -f runs/demo-lora/final/adapter_config.json ] || bash scripts/demo.sh

echo "== LoRA r 16 at three more learning rates (1e-3 is the demo's runs/demo-lora)"
finetune sweep recipes/demo-lora.yaml --grid train.lr=1e-4,3e-4,3e-3
echo "== full fine-tuning at its recipe's rate (5e-5) and four more"
finetune train recipes/demo-full.yaml
finetune sweep recipes/demo-full.yaml --grid train.lr=5e-6,1e-5,3e-5,1e-4

runs=(runs/demo-lora runs/demo-lora-sweep/lr={1e-4,3e-4,3e-3} runs/demo-full runs/demo-full-sweep/lr={5e-6,1e-5,3e-5,1e-4})
finetune report "${runs[@]}" --out runs/demo-sweep/first >/dev/null
# The LoRA and full runs nearest in new-task gain, as the comparison paired them, get a second training seed. LoRA's
# best run within the budget, or else its lowest rate that still learns the new task (gain within 0.1 of LoRA's
# best), is run again with replay.
read -r lora_lr full_lr replay_lr < <(python - <<'PY'
import json, yaml
compare = json.load(open("runs/demo-sweep/first/compare.json"))
rate = lambda run: float(yaml.safe_load(open(f"{run}/recipe.yaml"))["train"]["lr"])
short = lambda x: f"{x:.0e}".replace("e-0", "e-")  # 3e-4, as the sweep named its folders
pair = {("lora" if yaml.safe_load(open(f"{run}/recipe.yaml")).get("lora") else "full"): rate(run)
        for run in compare["method_comparison"][0]["runs"]}
lora = [r for r in compare["runs"] if r["family"] != "full"]
passing = [r for r in lora if r["status"] == "PASS"]
learns = [r for r in lora if r["gain"] >= max(r["gain"] for r in lora) - 0.1]
best = max(passing, key=lambda r: r["gain"]) if passing else min(learns, key=lambda r: rate(r["run"]))
print(short(pair["lora"]), short(pair["full"]), short(rate(best["run"])))
PY
)
echo "== a second training seed at matched gain: LoRA lr $lora_lr, full lr $full_lr"
seeds=("runs/demo-lora-sweep/lr=${lora_lr}_seed=1" "runs/demo-full-sweep/lr=${full_lr}_seed=1")
finetune train recipes/demo-lora.yaml "train.lr=$lora_lr" train.seed=1 "output.dir=${seeds[0]}"
finetune train recipes/demo-full.yaml "train.lr=$full_lr" train.seed=1 "output.dir=${seeds[1]}"
echo "== LoRA at lr $replay_lr with 5% of training tokens from general chat rows"
replay="runs/demo-lora-sweep/lr=${replay_lr}_replay"
[ "$replay_lr" = 1e-3 ] && replay=runs/demo-lora-replay  # the demo's own rate: the same run as scripts/demo-plane.sh's
finetune train recipes/demo-lora.yaml "train.lr=$replay_lr" "output.dir=$replay" \
  'data.replay={datasets: [{path: data/general/self_replay.jsonl, format: chat}], ratio: 0.05}'
echo
finetune report "${runs[@]}" "${seeds[@]}" "$replay" --out runs/demo-sweep
