#!/usr/bin/env bash
# Every runtime dependency in uv.lock installs on a 64-bit ARM gateway from a prebuilt wheel, for
# Python 3.11 and 3.12: uv installs the lock's runtime set (versions and hashes) for an aarch64
# Debian 12 (glibc 2.36, so manylinux_2_17 .. manylinux_2_36 wheels) into a scratch folder, with
# source builds refused, then every installed wheel's tags are checked. Needs PyPI (CI has it).
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORM=aarch64-manylinux_2_36
PYTHON_VERSIONS=(3.11 3.12)
# Published as a source distribution only, and pure Python: built here, and the check below
# proves the result is a py3-none-any wheel. azure-iot-device requires paho-mqtt < 2, and no 1.x
# release has a wheel.
PURE_PYTHON_SDISTS=(paho-mqtt)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
bash scripts/uv.sh export --quiet --frozen --no-emit-project --format requirements-txt \
  --output-file "$scratch/runtime.txt"

for version in "${PYTHON_VERSIONS[@]}"; do
  if ! bash scripts/uv.sh pip install --quiet --target "$scratch/$version" --no-deps \
      --require-hashes --python-platform "$PLATFORM" --python-version "$version" \
      --only-binary :all: --no-binary "${PURE_PYTHON_SDISTS[@]}" -r "$scratch/runtime.txt"; then
    echo "arm64 wheels: MISSING for Python $version on $PLATFORM: a runtime dependency in uv.lock" \
      "has no usable wheel (uv's message above names it); pick a version that has one, or a" \
      "different library" >&2
    exit 1
  fi
  .venv/bin/python - "$scratch/$version" "$version" "${PURE_PYTHON_SDISTS[@]}" <<'EOF'
"""Each installed wheel's tags must fit CPython <version> on aarch64 manylinux_2_36."""

import sys
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags, parse_tag
from packaging.utils import canonicalize_name

target, version, pure = Path(sys.argv[1]), sys.argv[2], set(sys.argv[3:])
python = tuple(int(part) for part in version.split("."))
platforms = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)]
platforms.append("manylinux2014_aarch64")
accepted: set[Tag] = set(cpython_tags(python, platforms=platforms))
accepted.update(compatible_tags(python, "cp" + version.replace(".", ""), platforms))
problems, count = [], 0
for wheel in sorted(target.glob("*.dist-info/WHEEL")):
    count += 1
    name = canonicalize_name(wheel.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0])
    tags = set()
    for line in wheel.read_text().splitlines():
        if line.startswith("Tag: "):
            tags.update(parse_tag(line.removeprefix("Tag: ")))
    if name in pure and tags != {Tag("py3", "none", "any")}:
        problems.append(f"{name}: built from source, but not pure Python: {sorted(map(str, tags))}")
    elif not tags & accepted:
        problems.append(f"{name}: no tag fits aarch64: {sorted(map(str, tags))}")
if problems or count == 0:
    print(f"arm64 wheels: Python {version}: " + ("; ".join(problems) or "nothing installed"))
    sys.exit(1)
print(f"arm64 wheels: Python {version} on aarch64 (glibc 2.36): all {count} runtime packages")
EOF
done
