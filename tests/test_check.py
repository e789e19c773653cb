"""``tunnel-agent check`` prints no secret and warns that an empty allow-list means any host."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import AgentFactory
from tests.support import toml_writer
from tests.support.tcp_camera import TcpCamera

KEY = base64.b64encode(b"check-key-0123456789abcdefghijk").decode()
SECRETS = {
    "inline camera password": "Inl1ne-Cam-S3cret",
    "camera password": 'Cam"Pass\\word',
    "query token": "Qu3ry-T0ken-Value",
    "mqtt password": "Mqtt-Pa55word",
    "media server password": "Med1a-Server-Pw",
    "proxy password": "Pr0xy-Secret",
    "hub key": KEY,
}


def check(tmp_path: Path, document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "agent.toml"
    config.write_text(toml_writer.dumps(document))
    return subprocess.run(
        [sys.executable, "-m", "tunnel_agent", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def full_config(tunnel: dict[str, Any]) -> dict[str, Any]:
    restream = {
        "name": "out",
        "task": "stream-to-rtsp",
        "media_server_address": "127.0.0.1",
        "media_server_username": "pub",
        "media_server_password": SECRETS["media server password"],
    }
    return {
        "hub": {"connection_string": f"HostName=h.example.net;DeviceId=gw1;SharedAccessKey={KEY}"},
        "proxy": {"url": f"http://gw:{SECRETS['proxy password']}@127.0.0.1:3128"},
        "tunnel": tunnel,
        "mqtt": {"url": "mqtt://127.0.0.1", "username": "u", "password": SECRETS["mqtt password"]},
        "cameras": [
            {
                "name": "lobby",
                "url": f"rtsp://admin:{SECRETS['inline camera password']}@10.0.0.5/s",
                "streams": [restream],
            },
            {
                "name": "door",
                "url": f"http://10.0.0.6/snap.jpg?user=admin&pwd={SECRETS['query token']}",
                "password": SECRETS["camera password"],
            },
        ],
    }


def test_check_output_holds_no_secret(tmp_path: Path) -> None:
    result = check(tmp_path, full_config({}))
    output = result.stdout + result.stderr
    for what, secret in SECRETS.items():
        assert secret not in output, what
        assert json.dumps(secret)[1:-1] not in output, what
    effective = json.loads(result.stdout[: result.stdout.index("\n}\n") + 2])
    lobby, door = effective["cameras"]
    assert lobby["url"] == "rtsp://admin:***@10.0.0.5/s"
    assert lobby["streams"][0]["media_server_password"] == "***"
    assert door["url"] == "http://10.0.0.6/snap.jpg?***"
    assert door["password"] == "***"
    assert effective["mqtt"]["password"] == "***"
    assert effective["proxy"]["url"] == "http://gw:***@127.0.0.1:3128"


def test_check_warns_once_that_any_remote_host_is_allowed(tmp_path: Path) -> None:
    open_to_all = check(tmp_path, full_config({})).stdout
    assert open_to_all.count("WARN  tunnel.allowed_remote_hosts is empty") == 1
    pinned = check(tmp_path, full_config({"allowed_remote_hosts": ["relay.example.net"]})).stdout
    assert "WARN" not in pinned


async def test_start_up_warns_once_that_any_remote_host_is_allowed(
    agent_factory: AgentFactory, stub: TcpCamera
) -> None:
    cameras = [{"name": "lobby", "host": "127.0.0.1", "ports": [stub.port]}]
    open_to_all = agent_factory(cameras)
    assert len(open_to_all.events("agent.any_remote_host")) == 1
    assert open_to_all.events("agent.any_remote_host")[0]["level"] == "WARNING"
    pinned = agent_factory(cameras, tunnel={"allowed_remote_hosts": ["127.0.0.1"]})
    assert pinned.events("agent.started") and not pinned.events("agent.any_remote_host")
