#!/usr/bin/env bash
# Refreshes requirements.lock: the newest releases that pyproject.toml allows (with the dev and deepspeed extras),
# each pinned with its hashes, resolved by pip-tools in a throwaway venv. torch is left out (unsafe-package):
# install.sh installs it first from requirements-torch.txt, as a CPU or CUDA build depending on the machine.
# Run it where pip finds a CPU build of torch (as on this project's machines): with only PyPI's CUDA build, CUDA's
# libraries would enter the lock. Then `bash scripts/test.sh` installs the new lock into .venv and runs the suite;
# commit the lock if it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=$(mktemp -d)
trap 'rm -rf "$TOOLS"' EXIT
python3 -m venv "$TOOLS"
"$TOOLS/bin/pip" install -q pip-tools
# The machine's own index and find-links options are not written into the lock: a fresh machine has its own.
"$TOOLS/bin/pip-compile" --quiet --upgrade --generate-hashes --strip-extras --unsafe-package torch \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --extra dev --extra deepspeed --constraint requirements-torch.txt \
  --output-file requirements.lock pyproject.toml
echo "lock: requirements.lock written (pip-compile's warning that torch is not pinned is expected: install.sh installs"
echo "lock: torch first); run bash scripts/test.sh, then commit the lock if the suite passes"
