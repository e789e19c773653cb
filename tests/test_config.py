"""Configuration: TOML + environment, validation errors that name the field and hide secrets."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.support import toml_writer
from tunnel_agent.config.loading import ConfigError, load_settings

KEY = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
CONNECTION_STRING = f"HostName=hub.example.net;DeviceId=gw1;SharedAccessKey={KEY}"


def write(tmp_path: Path, document: dict[str, object]) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(toml_writer.dumps(document))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def test_the_documented_example_loads(tmp_path: Path) -> None:
    (tmp_path / "hub-ca.pem").write_text("pem")
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[hub]
connection_string = "{CONNECTION_STRING}"
ca_file = "hub-ca.pem"
websockets = false

[proxy]
url = "http://user:pass@proxy:3128"

[tunnel]
connect_timeout = 5.0
handshake_timeout = 15.0
max_tunnels = 32
allowed_remote_hosts = ["*.example.net"]
allow_insecure_ws = false

[[cameras]]
name = "lobby"
host = "127.0.0.1"
ports = [554]
url = "rtsp://127.0.0.1:554/stream1"
username = "admin"
password = "camera-secret"
make = "Contoso"
model = "C-100"
"""
    )
    settings = load_settings(path)

    assert settings.hub is not None and settings.hub.ca_file == tmp_path / "hub-ca.pem"
    assert settings.tunnel.allowed_remote_hosts == ["*.example.net"]
    assert settings.cameras[0].ports == [554]
    proxy = settings.proxy.address
    assert proxy is not None and (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy",
        3128,
        "user",
        "pass",
    )
    assert "camera-secret" not in repr(settings) and KEY not in repr(settings)
    assert "pass@" not in repr(settings)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path, {"hub": {"connection_string": CONNECTION_STRING}, "tunnel": {"max_tunnels": 4}}
    )
    other = CONNECTION_STRING.replace("gw1", "gw2")
    monkeypatch.setenv("TUNNEL_AGENT_TUNNEL__MAX_TUNNELS", "9")
    monkeypatch.setenv("TUNNEL_AGENT_HUB__CONNECTION_STRING", other)
    monkeypatch.setenv("TUNNEL_AGENT_CAMERAS", '[{"name": "door", "ports": [8554]}]')

    settings = load_settings(path)

    assert settings.tunnel.max_tunnels == 9
    assert settings.hub is not None and settings.hub.connection_string is not None
    assert settings.hub.connection_string.get_secret_value() == other
    assert [c.name for c in settings.cameras] == ["door"]


def test_errors_name_each_wrong_field_and_never_show_secrets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "hub": {"connection_string": "HostName=h;DeviceId=d;SharedAccessKey=not*base64*secret"},
            "proxy": {"url": "ftp://u:proxy-secret@p:21"},
            "tunnel": {"max_tunnels": 0, "conect_timeout": 3},
            "cameras": [{"name": "lobby", "ports": [554, 70000], "password": "cam-secret"}],
        },
    )
    found = problems(path)
    text = "\n".join(found)

    assert any(
        p.startswith("hub.connection_string: invalid device connection string") for p in found
    )
    assert any(p.startswith("proxy.url: invalid proxy URL: scheme") for p in found)
    assert any(p.startswith("tunnel.max_tunnels:") for p in found)
    assert any(p.startswith("tunnel.conect_timeout: Extra inputs") for p in found)
    assert any(p.startswith("cameras.0.ports.1 (camera 'lobby'):") for p in found)
    for secret in ("not*base64*secret", "proxy-secret", "cam-secret"):
        assert secret not in text


@pytest.mark.parametrize(
    ("cameras", "expected"),
    [
        (
            [{"name": "a", "ports": [554]}, {"name": "b", "ports": [554]}],
            "cameras.1.ports: port 554 is already listed by camera 'a'",
        ),
        (
            [{"name": "a", "ports": [554, 554]}],
            "cameras.0.ports (camera 'a'): port 554 is listed twice",
        ),
        ([{"name": "a"}, {"name": "a"}], "cameras.1.name: camera name 'a' is used twice"),
        ([{"name": "bad name"}], "cameras.0.name (camera 'bad name'): use 1-63 letters"),
        ([{"name": "a", "host": "x/y"}], "cameras.0.host (camera 'a'): must be a host name"),
    ],
)
def test_camera_rules(tmp_path: Path, cameras: list[dict[str, object]], expected: str) -> None:
    found = problems(write(tmp_path, {"cameras": cameras}))
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("hub", "expected"),
    [
        ({}, "set exactly one of"),
        ({"connection_string": CONNECTION_STRING, "id_scope": "0ne00"}, "found 2"),
        ({"connection_string": "HostName=h;DeviceId=d"}, "missing SharedAccessKey"),
        ({"id_scope": "0ne00", "registration_id": "gw1"}, "either symmetric_key or cert_file"),
        ({"id_scope": "0ne00", "symmetric_key": KEY}, "registration_id"),
        (
            {"hostname": "hub.example.net", "device_id": "gw1"},
            "needs device_id, cert_file and key_file",
        ),
    ],
)
def test_hub_authentication_rules(tmp_path: Path, hub: dict[str, object], expected: str) -> None:
    found = problems(write(tmp_path, {"hub": hub}))
    assert any(expected in p and p.startswith("hub") for p in found), found


def test_missing_or_broken_files_are_reported(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.toml") == [f"config file not found: {tmp_path / 'nope.toml'}"]
    broken = tmp_path / "broken.toml"
    broken.write_text("[hub\n")
    assert problems(broken)[0].startswith(f"config file {broken}:")
    missing_ca = write(
        tmp_path, {"hub": {"connection_string": CONNECTION_STRING, "ca_file": "missing.pem"}}
    )
    assert any(p.startswith("hub.ca_file:") for p in problems(missing_ca))
