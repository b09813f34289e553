#!/usr/bin/env bash
# Installs what differs from requirements.lock, then runs the whole test suite (slow and multi-process tests included).
# FINETUNE_UNLOCKED=1: the newest releases instead (in .venv-unlocked); a failure then names the releases that differ
# from the lock, one of which changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=.venv
[ "${FINETUNE_UNLOCKED:-0}" = 1 ] && VENV=.venv-unlocked
. "$VENV/bin/activate"
status=0
# One worker per core (pytest-xdist): most tests run one thread, and the launch tests' ranks wait on each other.
python -m pytest -q -n auto "$@" || status=$?
if [ "$status" != 0 ] && [ "${FINETUNE_UNLOCKED:-0}" = 1 ]; then
  echo "test: the suite failed with the newest releases; those that differ from the lock:"
  finetune env --lock
fi
exit "$status"
