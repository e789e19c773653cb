"""URLs, hosts and ports in the configuration: parsed by a real URL parser, refused at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import toml_writer
from tunnel_agent.cloud.relay.settings import RelaySettings
from tunnel_agent.config.loading import ConfigError, load_any, load_settings
from tunnel_agent.config.urls import InvalidUrl, check_host, parse_url
from tunnel_agent.media.settings import MqttSettings


def problems_of(tmp_path: Path, document: dict[str, Any]) -> list[str]:
    path = tmp_path / "agent.toml"
    path.write_text(toml_writer.dumps(document))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def camera(**fields: Any) -> dict[str, Any]:
    return {"name": "lobby", **fields}


@pytest.mark.parametrize(
    ("document", "field", "reason"),
    [
        ({"mqtt": {"url": "mqtt://broker:abc"}}, "mqtt.url", "invalid port number"),
        ({"mqtt": {"url": "mqtt://broker:70000"}}, "mqtt.url", "invalid port number"),
        ({"mqtt": {"url": "mqtts://broker:0"}}, "mqtt.url", "port must be 1-65535"),
        ({"mqtt": {"url": "mqtt://bro ker"}}, "mqtt.url", "invalid"),
        ({"mqtt": {"url": "mqtt://-broker-"}}, "mqtt.url", "host must be a host name"),
        ({"mqtt": {"url": "mqtt://"}}, "mqtt.url", "host is missing"),
        ({"mqtt": {"url": "amqp://broker"}}, "mqtt.url", "scheme must be mqtt:// or mqtts://"),
        ({"mqtt": {"url": "mqtt://broker/topic"}}, "mqtt.url", "without a path"),
        ({"mqtt": {"url": "mqtt://u:pw@broker"}}, "mqtt.url", "credentials"),
        ({"cameras": [camera(url="rtsp://cam:55x/s")]}, "cameras.0.url", "invalid port number"),
        ({"cameras": [camera(url="rtsp://cam:0/s")]}, "cameras.0.url", "port must be 1-65535"),
        ({"cameras": [camera(url="rtsp://ca_m..x/s")]}, "cameras.0.url", "host must be"),
        ({"cameras": [camera(url="https://:80/snap.jpg")]}, "cameras.0.url", "empty host"),
        ({"cameras": [camera(url="gopher://cam/s")]}, "cameras.0.url", "url must be rtsp://"),
        ({"cameras": [camera(url="file://nas/clip.mkv")]}, "cameras.0.url", "names a host"),
        ({"cameras": [camera(host="cam..lan")]}, "cameras.0.host", "must be a host name"),
        ({"cameras": [camera(host="-cam")]}, "cameras.0.host", "must be a host name"),
        ({"proxy": {"url": "http://proxy:99999"}}, "proxy.url", "not a valid URL"),
        ({"proxy": {"url": "http://prox y:3128"}}, "proxy.url", "must be a host name"),
        ({"observability": {"listen": "127.0.0.1:http"}}, "observability.listen", "host:port"),
        ({"observability": {"listen": "bad host:9400"}}, "observability.listen", "DNS name"),
        ({"observability": {"listen": "::1:9400"}}, "observability.listen", "brackets"),
    ],
)
def test_bad_urls_hosts_and_ports_are_refused_at_load(
    tmp_path: Path, document: dict[str, Any], field: str, reason: str
) -> None:
    found = problems_of(tmp_path, document)
    assert any(p.startswith(field) and reason in p for p in found), found


def test_media_server_address_must_be_a_host(tmp_path: Path) -> None:
    stream = {
        "name": "out",
        "task": "stream-to-rtsp",
        "media_server_address": "media server/x",
    }
    found = problems_of(tmp_path, {"cameras": [camera(url="rtsp://cam/s", streams=[stream])]})
    assert any(
        p.startswith("cameras.0.streams.0.media_server_address") and "host name" in p for p in found
    ), found


def test_passwords_in_a_refused_url_are_not_repeated(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"cameras": [camera(url="rtsp://admin:Sup3r-S3cret@cam:x/s")]})
    assert found and not any("Sup3r-S3cret" in p for p in found)


def test_good_urls_load_and_give_hosts_and_ports(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        toml_writer.dumps(
            {
                "mqtt": {"url": "mqtts://[2001:db8::1]:8884"},
                "cameras": [camera(host="[::1]", url="rtsp://admin:p%40ss@Cam.Example:8554/s?x=1")],
                "observability": {"listen": "[::1]:0"},
            }
        )
    )
    settings = load_settings(path)
    assert settings.mqtt is not None
    assert settings.mqtt.host_port == ("2001:db8::1", 8884) and settings.mqtt.tls
    assert MqttSettings(url="mqtt://broker").host_port == ("broker", 1883)
    assert settings.cameras[0].host == "::1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtsp://u:p%3Aw@Host.Example:554/a?b#c", ("rtsp", "host.example", 554, "u", "p:w")),
        ("wss://[::1]/t", ("wss", "::1", 443, None, None)),
        ("rtsp://[::1]/t", ("rtsp", "::1", None, None, None)),
        ("https://cam", ("https", "cam", 443, None, None)),
    ],
)
def test_parse_url_parts(text: str, expected: tuple[Any, ...]) -> None:
    url = parse_url(text, ("rtsp", "wss", "https"))
    assert (url.scheme, url.host, url.port, url.username, url.password) == expected


@pytest.mark.parametrize("host", ["", "a..b", "-a", "a-", "a b", "a/b", "x" * 64, "[cam]", "é.lan"])
def test_check_host_refuses(host: str) -> None:
    with pytest.raises(InvalidUrl):
        check_host(host)


def test_relay_urls_are_parsed(tmp_path: Path) -> None:
    base = {
        "relay": {"allow_insecure_ws": True, "public_url": "wss://relay.example.net:8443/"},
        "iothub": {
            "service_connection_string": "HostName=h.example.net;SharedAccessKeyName=s;"
            "SharedAccessKey=c2VjcmV0a2V5c2VjcmV0a2V5"
        },
    }
    path = tmp_path / "relay.toml"
    path.write_text(toml_writer.dumps(base))
    assert load_any(RelaySettings, path, ()).relay.public_url == "wss://relay.example.net:8443"
    for public_url, reason in (
        ("wss://relay:84x3", "invalid port number"),
        ("https://relay", "scheme must be"),
        ("wss://relay/?t=1", "without credentials, query or fragment"),
    ):
        path.write_text(
            toml_writer.dumps({**base, "relay": {**base["relay"], "public_url": public_url}})
        )
        with pytest.raises(ConfigError) as caught:
            load_any(RelaySettings, path, ())
        assert any(
            p.startswith("relay.public_url") and reason in p for p in caught.value.problems
        ), caught.value.problems
