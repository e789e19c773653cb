#!/usr/bin/env bash
# The whole path on this machine, no cloud account: installs what the demo needs (apt packages,
# .venv from uv.lock), then runs `tunnel-agent demo` from this source tree (camera -> agent ->
# emulated IoT Hub -> relay -> video player).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --keep-running`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh demo
bash scripts/setup-venv.sh demo
# -m from the source tree's root: the demo, the devhub and the camera are not installed, they run
# from here (the agent's wheel leaves them out).
exec .venv/bin/python -m tunnel_agent demo "$@"
