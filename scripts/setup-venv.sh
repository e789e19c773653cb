#!/usr/bin/env bash
# Create .venv (if needed) and install the project. Argument: the extras to add, e.g. "test".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ -n "$EXTRAS" ]; then
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "venv: ready ($(.venv/bin/python --version), tunnel-agent $(.venv/bin/tunnel-agent --version | cut -d' ' -f2))"
