"""Container health check with the standard library only (the image has no curl).

Exit 0 when GET $HEALTHCHECK_URL answers 200, 1 otherwise. The default is the agent's
observability endpoint; the relay sets HEALTHCHECK_URL=https://127.0.0.1:8443/healthz.
The check runs inside the container's own network namespace, so loopback reaches the process.
For https on loopback the certificate is not verified: it names the public host, not 127.0.0.1,
and this probe only asks "is the process serving?", it sends no secret.
"""

import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9400/healthz"


def main() -> int:
    url = os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        print(f"healthcheck: unsupported URL {url!r}", file=sys.stderr)
        return 1
    context = None
    if parts.scheme == "https" and parts.hostname in ("127.0.0.1", "::1", "localhost"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
