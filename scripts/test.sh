#!/usr/bin/env bash
# The whole test suite: lint, types, the arm64 wheel check, then pytest (unit and real-component
# integration tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh test
bash scripts/setup-venv.sh test
.venv/bin/python -m ruff check tunnel_agent tests bench scripts
.venv/bin/python -m mypy --strict tunnel_agent
bash scripts/check-arm64-wheels.sh
exec .venv/bin/python -m pytest -q "$@"
