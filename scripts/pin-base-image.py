"""Pin the Dockerfile's base image to the digest of its multi-arch index, asked of Docker Hub.

    python3 scripts/pin-base-image.py                 # the tag the Dockerfile names now
    python3 scripts/pin-base-image.py --check-only    # print the digest, change nothing

The digest is the one of the image index (the manifest list), so one pin serves linux/amd64 and
linux/arm64; the index must list both, or nothing is written. Standard library only, run with any
Python 3.11+ that reaches registry-1.docker.io and auth.docker.io. To move to a newer base image
(security fixes), run it again: it re-reads the tag and writes the new digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.request
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
ARG_LINE = re.compile(r"^ARG PYTHON_IMAGE=(?P<image>[^\s@]+)(?:@sha256:[0-9a-f]{64})?$", re.M)
NOT_PINNED = "# NOT PINNED YET: until it is, the tag alone is used.\n"
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
REQUIRED_PLATFORMS = {("linux", "amd64"), ("linux", "arm64")}
TIMEOUT_S = 20.0


class PinError(Exception):
    """The registry's answer cannot be pinned; the message says why."""


def verified_index_digest(body: bytes, header_digest: str | None) -> str:
    """The sha256 digest of an image index that lists every required platform."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if header_digest is not None and header_digest != digest:
        raise PinError(f"the registry says {header_digest}, the body hashes to {digest}")
    index = json.loads(body)
    if index.get("mediaType") not in INDEX_TYPES:
        raise PinError(f"not a multi-arch index: {index.get('mediaType')}")
    found = {
        (entry.get("platform", {}).get("os"), entry.get("platform", {}).get("architecture"))
        for entry in index.get("manifests", [])
    }
    missing = REQUIRED_PLATFORMS - found
    if missing:
        raise PinError(f"the index lacks {sorted('/'.join(p) for p in missing)}")
    return digest


def pinned_dockerfile(text: str, digest: str) -> str:
    """The Dockerfile with PYTHON_IMAGE pinned to the digest and the NOT PINNED note gone."""
    match = ARG_LINE.search(text)
    if match is None:
        raise PinError("no `ARG PYTHON_IMAGE=...` line in the Dockerfile")
    line = f"ARG PYTHON_IMAGE={match['image']}@{digest}"
    text = text[: match.start()] + line + text[match.end() :]
    return text.replace(NOT_PINNED, "")


def fetch_index(image: str) -> tuple[bytes, str | None]:
    """The index of `image` (`name:tag`, Docker Hub) and the digest header the registry sent."""
    name, _, tag = image.partition(":")
    repository = name if "/" in name else f"library/{name}"
    token_url = (
        "https://auth.docker.io/token?service=registry.docker.io"
        f"&scope=repository:{repository}:pull"
    )
    with urllib.request.urlopen(token_url, timeout=TIMEOUT_S) as answer:  # noqa: S310
        token = json.load(answer)["token"]
    request = urllib.request.Request(
        f"https://registry-1.docker.io/v2/{repository}/manifests/{tag or 'latest'}",
        headers={"Authorization": f"Bearer {token}", "Accept": ", ".join(INDEX_TYPES)},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310
        return answer.read(), answer.headers.get("Docker-Content-Digest")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="print the digest only")
    args = parser.parse_args()
    text = DOCKERFILE.read_text()
    match = ARG_LINE.search(text)
    if match is None:
        print("pin-base-image: no `ARG PYTHON_IMAGE=...` line in the Dockerfile", file=sys.stderr)
        return 1
    try:
        digest = verified_index_digest(*fetch_index(match["image"]))
        if not args.check_only:
            DOCKERFILE.write_text(pinned_dockerfile(text, digest))
    except (OSError, ValueError, KeyError, PinError) as exc:
        print(f"pin-base-image: {match['image']}: {exc}", file=sys.stderr)
        return 1
    print(f"{match['image']}@{digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
