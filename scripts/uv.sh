#!/usr/bin/env bash
# The project's pinned uv (scripts/uv-requirements.txt): `bash scripts/uv.sh ARGS...` runs
# `uv ARGS...`, first installing that exact uv into .venv-tools (a small venv of its own, so it
# works where pip refuses system-wide installs) with pip --require-hashes.
# Environment: PYTHON, the interpreter for the venvs (default python3, 3.11 or newer).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TOOLS="$ROOT/.venv-tools"
REQUIREMENTS="$ROOT/scripts/uv-requirements.txt"

bash "$ROOT/scripts/check-python.sh"

wanted=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$REQUIREMENTS")
installed=$("$TOOLS/bin/uv" --version 2>/dev/null | cut -d' ' -f2 || true)
if [ "$installed" != "$wanted" ]; then
  echo "uv: installing uv $wanted into .venv-tools (from PyPI, hash-checked)" >&2
  rm -rf "$TOOLS"
  log=$(mktemp)
  if ! { "$PYTHON" -m venv "$TOOLS" && "$TOOLS/bin/python" -m pip install --disable-pip-version-check \
      --no-input --no-deps --only-binary=:all: --require-hashes -r "$REQUIREMENTS"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "uv: could not install uv $wanted (on Debian/Ubuntu, python3 -m venv needs the python3-venv package)" >&2
    exit 1
  fi
  rm -f "$log"
fi

# Never fetch a Python build: the venvs use $PYTHON, the system's interpreter.
export UV_PYTHON_DOWNLOADS=never UV_PYTHON="$PYTHON"
exec "$TOOLS/bin/uv" "$@"
