#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (slow and multi-process tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
