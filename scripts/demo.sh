#!/usr/bin/env bash
# The whole path on this machine, no cloud account: installs what is missing, then runs
# `tunnel-agent demo` (camera -> agent -> emulated IoT Hub -> relay -> video player).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --keep-running`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup-venv.sh
exec .venv/bin/tunnel-agent demo "$@"
