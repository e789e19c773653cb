#!/usr/bin/env bash
# .venv from uv.lock, exactly (versions and hashes; nothing is resolved here). Argument: what for.
#   test     everything the tests need: the project (editable) with the [test] extra; the default
#   demo     what `tunnel-agent demo` needs, run from this source tree: no install of the project
#   runtime  the agent and the relay only: the project (editable) and its runtime dependencies
# Environment: PYTHON, the interpreter (default python3, 3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
PURPOSE=${1:-test}
case "$PURPOSE" in
  test) args=(--extra test) ;;
  # --inexact: keeps what a test set-up installed in the same .venv.
  demo) args=(--extra devhub --no-install-project --inexact) ;;
  runtime) args=() ;;
  *) echo "usage: $0 [test|demo|runtime]" >&2; exit 2 ;;
esac
bash scripts/uv.sh --version >/dev/null  # the Python check and uv itself, with their own messages
# --locked: stop, instead of resolving anew, when uv.lock no longer matches pyproject.toml.
if ! bash scripts/uv.sh sync --quiet --locked "${args[@]}"; then
  echo "venv: not ready; if uv.lock is out of date, see \"Updating the lock\" in README.md" >&2
  exit 1
fi
echo "venv: ready for $PURPOSE ($(.venv/bin/python -V), from uv.lock)"
