"""``tunnel-agent snapshot`` verifies an RTSPS camera exactly as the running agent does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import toml_writer
from tests.support.camera import RtspCamera
from tunnel_agent.cloud.devhub.certs import LocalCA


def serve_rtsps(folder: Path, cert_pem: bytes) -> RtspCamera:
    pem = folder / "camera.pem"
    pem.write_bytes(cert_pem)
    return RtspCamera(folder, extra=["--tls-cert", str(pem)])


@pytest.fixture(scope="module")
def trusted_camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RtspCamera, Path]]:
    folder = tmp_path_factory.mktemp("rtsps-trusted")
    ca = LocalCA(folder / "ca")
    pair = ca.issue("camera", ["127.0.0.1"])
    camera = serve_rtsps(folder, pair.cert_file.read_bytes() + pair.key_file.read_bytes())
    yield camera, ca.cert_file
    camera.stop()


def snapshot(
    tmp_path: Path, camera: dict[str, Any]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    config, output = tmp_path / "agent.toml", tmp_path / "snap.jpg"
    config.write_text(toml_writer.dumps({"cameras": [{"name": "door", **camera}]}))
    command = ["snapshot", "--config", str(config), "--camera", "door", "-o", str(output)]
    result = subprocess.run(
        [sys.executable, "-m", "tunnel_agent", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, output


def rtsps_url(camera: RtspCamera) -> str:
    return camera.url().replace("rtsp://", "rtsps://", 1)


def test_an_untrusted_rtsps_camera_is_refused_without_ca_file(tmp_path: Path) -> None:
    stranger = trustme.CA().issue_cert("127.0.0.1")
    camera = serve_rtsps(
        tmp_path,
        b"".join(b.bytes() for b in stranger.cert_chain_pems) + stranger.private_key_pem.bytes(),
    )
    try:
        result, output = snapshot(tmp_path, {"url": rtsps_url(camera)})
    finally:
        camera.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("tunnel-agent snapshot: ")
    assert not output.exists()


def test_a_trusted_rtsps_camera_gives_a_snapshot(
    tmp_path: Path, trusted_camera: tuple[RtspCamera, Path]
) -> None:
    camera, ca_file = trusted_camera
    result, output = snapshot(tmp_path, {"url": rtsps_url(camera), "ca_file": str(ca_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{output} (640x360)"
    assert output.read_bytes()[:3] == b"\xff\xd8\xff"


def test_the_system_store_does_not_trust_a_private_ca(
    tmp_path: Path, trusted_camera: tuple[RtspCamera, Path]
) -> None:
    camera, _ = trusted_camera
    result, output = snapshot(tmp_path, {"url": rtsps_url(camera)})
    assert result.returncode == 1 and not output.exists()
