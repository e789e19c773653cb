"""The README's first command: ``tunnel-agent demo`` runs the whole path and says what it saw."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tunnel_agent import demo, ports
from tunnel_agent.cloud.devhub.broker import INSTALL_HINT


def test_demo_plays_video_through_the_whole_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunnel_agent", "demo", "--seconds", "4", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.rstrip().endswith("demo OK")
    assert re.search(r"^\s+\d+\.\d s\s+\d+ frames\s+\d+ fps", out, re.M), "no live progress"
    frames = int(re.search(r"frames decoded\s+(\d+) \(h264 640x360", out).group(1))  # type: ignore[union-attr]
    assert frames >= 30
    rtt = float(re.search(r"tunnelOpen round trip\s+([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    assert 0 < rtt < 5000
    to_viewer = int(re.search(r"bytes camera -> viewer\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert to_viewer > 50_000
    assert f"bytes_to_remote={to_viewer}" in out  # the agent carried exactly what the viewer got
    snapshot = tmp_path / "snapshot.jpg"
    assert f"snapshot                {snapshot}" in out
    with av.open(str(snapshot)) as image:
        frame = next(image.decode(video=0))
    assert (frame.width, frame.height) == (640, 360)


def test_demo_names_a_missing_prerequisite(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "find_mosquitto", lambda: None)
    monkeypatch.setattr(demo, "SYSTEM_PYTHON", "/nonexistent/python3")

    assert demo.run_demo(seconds=1) == 1

    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "tunnel-agent demo: " + INSTALL_HINT
    assert "gir1.2-gst-rtsp-server-1.0" in lines[1]


def test_the_demo_picks_its_ports_outside_the_kernels_ephemeral_range() -> None:
    # Its components bind late; outgoing connections made meanwhile take ephemeral ports.
    ephemeral = ports.ephemeral_ports()
    picked = [demo.free_port() for _ in range(50)]

    assert len(set(picked)) == 50
    assert all(port not in ephemeral and port >= ports.LOWEST_PICKED_PORT for port in picked)
