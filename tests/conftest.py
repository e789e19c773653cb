"""Fixtures: the real components every integration test stands on.

Session-scoped servers (hub broker, cameras, WebSocket endpoint) run in child processes or on a
background event loop so that each test keeps its own loop; agents are per test.

Every agent is checked (``AgentRunner``, whether from ``agent_factory`` or made by hand). After
each test, a test fails if an agent's log gained an ERROR or CRITICAL line or a traceback during
it, or if an agent exited with a code other than the one expected (0 by default, as SIGTERM
should end it). Agents a test leaves running are stopped first; agents of a module fixture are
checked after each test for their log and at the module's end for their exit code.

A test that provokes an error names the ERROR events it expects, as narrowly as it can:

- for one agent: ``AgentRunner(..., expected_errors={"media.task_failed"})`` or
  ``agent_factory(cameras, expected_errors={"media.task_failed"})``;
- for every agent of one test: ``@pytest.mark.agent_errors("media.task_failed")``.

Tracebacks are never allowed. A test that kills an agent on purpose says so with
``agent.kill()``, or ``expected_exit=None`` (any code) or a code (``expected_exit=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme

from tests.support.agent import AgentRunner
from tests.support.camera import SYSTEM_PYTHON, RtspCamera
from tests.support.hub import HubHarness
from tests.support.processes import stop_all
from tests.support.tcp_camera import TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.ws_endpoint import TunnelEndpoint
from tunnel_agent.cloud.devhub.certs import LocalCA

REQUIRED_TOOLS = (
    "mosquitto",
    "ffprobe",
    "tinyproxy",
    "microsocks",
    "danted",
    "socat",
    "gst-launch-1.0",
)


TEARDOWN_AFTER_SIGTERM_S = 60.0


def _interrupt(signum: int, _frame: object) -> None:
    threading.Thread(target=_end_after_teardown, args=(signum,), daemon=True).start()
    raise KeyboardInterrupt(f"signal {signum}")


def _end_after_teardown(signum: int) -> None:
    """If the interrupt was swallowed or the teardown hangs, the run still ends, children first."""
    time.sleep(TEARDOWN_AFTER_SIGTERM_S)
    stop_all()
    os._exit(128 + signum)


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (``timeout``, a CI's cancel) ends the run as Ctrl-C does, through every fixture's
    teardown: child processes stopped, network namespaces removed. Without it Python dies at once
    and the children, in sessions of their own, live on. A run that has not ended a minute after
    the signal stops its children and exits."""
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [
        tool
        for tool in REQUIRED_TOOLS
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if not Path(SYSTEM_PYTHON).exists():
        missing.append(SYSTEM_PYTHON)
    if missing:
        raise pytest.UsageError(
            f"missing test prerequisites: {', '.join(missing)} (bash .ci/run installs them)"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_all()


def _order_line(config: pytest.Config) -> str | None:
    """How to run the tests again in this order (pytest-randomly's seed), even under ``-q``."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is None or not config.pluginmanager.has_plugin("randomly"):
        return None
    return f"random order: --randomly-seed={seed} (repeat with -p randomly --randomly-seed={seed})"


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    line = _order_line(config)
    if line is not None and config.get_verbosity() < 0:  # -q hides report headers
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)
    return []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    line = _order_line(config)
    if line is not None:
        terminalreporter.write_line(line)


def _check_agents(request: pytest.FixtureRequest, earlier: list[AgentRunner]) -> None:
    """Fail on problems of every agent; those started in this scope are stopped first."""
    allowed = {event for mark in request.node.iter_markers("agent_errors") for event in mark.args}
    for runner in AgentRunner.instances:
        if runner not in earlier:
            runner.stop()
    problems = [p for runner in AgentRunner.instances for p in runner.take_problems(allowed)]
    AgentRunner.instances[:] = [r for r in AgentRunner.instances if not r.checked_to_the_end]
    if problems:
        pytest.fail("agent log or exit code:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _module_agents_end_cleanly(request: pytest.FixtureRequest) -> Iterator[None]:
    earlier = list(AgentRunner.instances)
    yield
    _check_agents(request, earlier)


@pytest.fixture(autouse=True)
def _agents_end_cleanly(request: pytest.FixtureRequest) -> Iterator[None]:
    earlier = list(AgentRunner.instances)
    yield
    _check_agents(request, earlier)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def ca(state_dir: Path) -> LocalCA:
    return LocalCA(state_dir / "ca")


@pytest.fixture(scope="session")
def servers() -> Iterator[ThreadLoop]:
    loop = ThreadLoop("test-servers")
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def hub(state_dir: Path, ca: LocalCA, servers: ThreadLoop) -> Iterator[HubHarness]:
    harness = HubHarness(state_dir, ca, servers)
    yield harness
    harness.stop()


@pytest.fixture(scope="session")
def camera(state_dir: Path) -> Iterator[RtspCamera]:
    cam = RtspCamera(state_dir)
    yield cam
    cam.stop()


@pytest.fixture(scope="session")
def auth_camera(state_dir: Path) -> Iterator[RtspCamera]:
    cam = RtspCamera(state_dir, user="viewer", password="cam-Pa55-word")
    yield cam
    cam.stop()


@pytest.fixture(scope="session")
def digest_camera(state_dir: Path) -> Iterator[RtspCamera]:
    cam = RtspCamera(state_dir, user="viewer", password="cam-Pa55-word", auth="digest")
    yield cam
    cam.stop()


@pytest.fixture(scope="session")
def endpoint_tls(ca: LocalCA) -> ssl.SSLContext:
    pair = ca.issue("endpoint", ["127.0.0.1", "localhost"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert_file, pair.key_file)
    return context


@pytest.fixture(scope="session")
def untrusted_tls() -> ssl.SSLContext:
    stranger = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def endpoint(
    servers: ThreadLoop, endpoint_tls: ssl.SSLContext, untrusted_tls: ssl.SSLContext
) -> Iterator[TunnelEndpoint]:
    server = TunnelEndpoint(endpoint_tls, untrusted_tls)
    servers.run(server.start())
    yield server
    servers.run(server.stop())


SHARED_CAMERAS = ("camera", "auth_camera", "digest_camera")


@pytest.fixture(autouse=True)
def _shared_cameras_running(request: pytest.FixtureRequest) -> None:
    """A shared camera that died in an earlier test is started again, said in a warning."""
    for name in SHARED_CAMERAS:
        if name in request.fixturenames:
            cam: RtspCamera = request.getfixturevalue(name)
            last_words = cam.restart_if_dead()
            if last_words is not None:
                warnings.warn(
                    f"the shared camera on port {cam.port} had exited and was started again;"
                    f" its log ended with: {last_words[-600:]}",
                    stacklevel=1,
                )


def camera_entry(cam: RtspCamera, name: str = "lobby", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "host": cam.host, "ports": [cam.port], "url": cam.url()}
    if cam.user:
        entry["username"] = cam.user
        entry["password"] = cam.password
    entry.update(extra)
    return entry


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[TcpCamera]:
    """A bare TCP "camera" in the test's own loop, for tests that watch the socket's fate."""
    cam = TcpCamera()
    await cam.start()
    yield cam
    await cam.stop()


AgentFactory = Callable[..., AgentRunner]


@pytest.fixture
def agent_factory(tmp_path: Path, hub: HubHarness, ca: LocalCA) -> Iterator[AgentFactory]:
    """Start agents with the hub and CA filled in; each is stopped and checked after the test."""
    started: list[AgentRunner] = []

    def start(
        cameras: list[dict[str, Any]],
        *,
        tunnel: dict[str, Any] | None = None,
        hub_config: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        expected_errors: Iterable[str] = (),
        expected_exit: int | None = 0,
    ) -> AgentRunner:
        config: dict[str, Any] = {
            "hub": hub_config or hub.hub_config(),
            "tunnel": {"ca_file": str(ca.cert_file), **(tunnel or {})},
            "cameras": cameras,
            **(extra or {}),
        }
        runner = AgentRunner(
            tmp_path / f"agent{len(started)}",
            config,
            env=env,
            expected_errors=expected_errors,
            expected_exit=expected_exit,
        )
        started.append(runner)
        if wait:
            runner.wait_connected()
            hub.wait_device()
        return runner

    yield start
    for runner in started:
        runner.stop()
    hub.wait_device_gone()
