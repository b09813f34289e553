#!/usr/bin/env bash
# Multi-node training under SLURM: one `finetune launch` (accelerate's launcher) per node, rendezvous taken from
# SLURM's environment, requeued when preempted. finetune resumes from the newest complete checkpoint in output.dir on
# every start.
#
#   sbatch --nodes=2 launch/slurm.sh recipes/<recipe>.yaml [section.key=value ...]
#   ACCELERATE_CONFIG=launch/multinode_fsdp.yaml sbatch --nodes=4 launch/slurm.sh recipes/<recipe>.yaml
#
# Edit the #SBATCH lines for your cluster (partition, GPUs per node, time). GPUS_PER_NODE must match --gpus-per-node.
#SBATCH --job-name=finetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

CONFIG=${ACCELERATE_CONFIG:-launch/multinode_ddp.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# awk reads the whole list: `head -n 1` may close the pipe before scontrol is done, and pipefail then kills the job.
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
MAIN_PORT=${MAIN_PORT:-29500}

# SLURM sends SIGTERM (here 120 s before the time limit, or on preemption) to this batch shell: pass it to the
# ranks, wait for them, and put the job back in the queue; the next start resumes from the last checkpoint.
requeue() {
  echo "SIGTERM: stopping ranks and requeueing job $SLURM_JOB_ID"
  kill -TERM "$srun_pid" 2>/dev/null || true
  wait "$srun_pid" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue TERM

# One launcher per node; each learns its rank from SLURM_NODEID. The values here override the config file's
# num_machines / num_processes / machine_rank / main_process_ip, so the file stays a template.
args=$(printf '%q ' "$@")  # the recipe and overrides, quoted for the inner shell
srun --kill-on-bad-exit=1 bash -c "finetune launch \
  --config_file '$CONFIG' \
  --num_machines '$SLURM_NNODES' \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \"\$SLURM_NODEID\" \
  --main_process_ip '$MAIN_HOST' \
  --main_process_port '$MAIN_PORT' \
  --rdzv_backend static \
  train $args" &
srun_pid=$!
wait "$srun_pid"
