#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest (unit and real-component integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup-venv.sh test
.venv/bin/python -m ruff check tunnel_agent tests bench
.venv/bin/python -m mypy --strict tunnel_agent
exec .venv/bin/python -m pytest -q "$@"
