"""Run the three benchmarks one after the other: ``python -m bench.run_all``.

Each runs in its own interpreter (its own hub, agent and peers) so one's leftovers cannot skew the
next; arguments after ``--quick`` shorten the windows for a smoke run.
"""

from __future__ import annotations

import subprocess
import sys

from bench.common import REPO

QUICK = {
    "throughput": ["--seconds", "2", "--rounds", "1"],
    "paced_tunnels": ["--seconds", "6", "--warmup", "2"],
    "open_latency": ["--count", "30"],
}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for name, short in QUICK.items():
        print(f"===== bench.{name} =====", flush=True)
        args = [sys.executable, "-m", f"bench.{name}", *(short if quick else [])]
        try:
            code = subprocess.run(args, cwd=REPO, check=False).returncode
        except KeyboardInterrupt:
            return 130  # the child got the same Ctrl-C and cleans up after itself
        if code:
            failed.append(name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
