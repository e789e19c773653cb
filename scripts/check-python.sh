#!/usr/bin/env bash
# Stops with a clear message unless $PYTHON (default python3) is Python 3.11 or newer.
# --if-present: say nothing when there is no such interpreter yet (apt is about to install it).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--if-present" ] && ! command -v "$PYTHON" >/dev/null; then
  exit 0
fi
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
if [ -z "$version" ]; then
  echo "tunnel-agent: cannot run $PYTHON; it needs Python 3.11 or newer (Debian 12, Ubuntu 24.04)," \
    "or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ "${version%%.*}" -lt 3 ] || { [ "${version%%.*}" -eq 3 ] && [ "${version#*.}" -lt 11 ]; }; then
  echo "tunnel-agent: needs Python 3.11 or newer; $PYTHON is Python $version." \
    "Use Debian 12 or Ubuntu 24.04, or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
