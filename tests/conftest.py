"""Fixtures: the real components every integration test stands on.

Session-scoped servers (hub broker, cameras, WebSocket endpoint) run in child processes or on a
background event loop so that each test keeps its own loop; agents are per test.
"""

from __future__ import annotations

import shutil
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
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

REQUIRED_TOOLS = ("mosquitto", "ffprobe", "tinyproxy", "microsocks", "socat")


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
    """Start agents with the hub and CA filled in; each is stopped after the test."""
    started: list[AgentRunner] = []

    def start(
        cameras: list[dict[str, Any]],
        *,
        tunnel: dict[str, Any] | None = None,
        hub_config: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> AgentRunner:
        config: dict[str, Any] = {
            "hub": hub_config or hub.hub_config(),
            "tunnel": {"ca_file": str(ca.cert_file), **(tunnel or {})},
            "cameras": cameras,
            **(extra or {}),
        }
        runner = AgentRunner(tmp_path / f"agent{len(started)}", config, env=env)
        started.append(runner)
        if wait:
            runner.wait_connected()
            hub.wait_device()
        return runner

    yield start
    for runner in started:
        runner.stop()
    hub.wait_device_gone()
