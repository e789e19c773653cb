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
# --compile-bytecode, and the project's own sources below: every process (the suite starts
# hundreds) otherwise compiles every module from source when PYTHONDONTWRITEBYTECODE is set or
# the tree is read-only, at ~0.6 s of CPU and ~4 MiB of RSS for each agent start.
if ! bash scripts/uv.sh sync --quiet --locked --compile-bytecode "${args[@]}"; then
  echo "venv: not ready; if uv.lock is out of date, see \"Updating the lock\" in README.md" >&2
  exit 1
fi
.venv/bin/python -m compileall -q -j 0 tunnel_agent tests bench
echo "venv: ready for $PURPOSE ($(.venv/bin/python -V), from uv.lock)"
