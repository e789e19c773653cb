"""The RTSP steering state machine, fed with real conversations and with hand-made edge cases.

tests/data/rtsp/*.json were recorded here with a small TCP proxy between each client (on its
default transport) and the synthetic camera (plain and Digest), which answered UDP-only SETUPs
with 461 the way the relay does: ffmpeg 5.1 (``ffmpeg -i rtsp://...``) and GStreamer 1.22
(``gst-launch-1.0 rtspsrc location=rtsp://...``). Each file lists the chunks in the order the
proxy saw them, base64, with the side they came from; chunks after the PLAY answer are cut to a
few.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from tunnel_agent.cloud.relay.rtsp_steering import RtspSteering

DATA = Path(__file__).parent / "data" / "rtsp"
RECORDINGS = sorted(p.stem for p in DATA.glob("*.json"))


def conversation(name: str) -> list[tuple[str, bytes]]:
    events = json.loads((DATA / f"{name}.json").read_text())
    return [(e["from"], base64.b64decode(e["data"])) for e in events]


def requests_in(data: bytes) -> list[bytes]:
    return re.findall(rb"^([A-Z_]+) rtsp://", data, re.MULTILINE)


def replay(name: str, *, byte_by_byte: bool = False) -> tuple[RtspSteering, bytes, bytes]:
    """Feed a recording through the machine; what reached the camera and the consumer."""
    machine = RtspSteering()
    to_camera, to_consumer = bytearray(), bytearray()
    for side, data in conversation(name):
        pieces = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
        for piece in pieces:
            if side == "client":
                steered = machine.from_consumer(piece)
                to_camera += steered.to_camera
                to_consumer += steered.to_consumer
            else:
                to_consumer += machine.from_camera(piece)
    return machine, bytes(to_camera), bytes(to_consumer)


def test_recordings_cover_ffmpeg_and_gstreamer_with_and_without_digest() -> None:
    assert RECORDINGS == ["ffmpeg-digest", "ffmpeg-plain", "gst-digest", "gst-plain"]


@pytest.mark.parametrize("name", RECORDINGS)
@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_udp_setups_are_answered_461_and_everything_else_passes_untouched(
    name: str, byte_by_byte: bool
) -> None:
    machine, to_camera, to_consumer = replay(name, byte_by_byte=byte_by_byte)

    client = b"".join(d for side, d in conversation(name) if side == "client")
    camera = b"".join(d for side, d in conversation(name) if side == "server")
    udp_setups = re.findall(
        rb"SETUP [^\r]*\r\n(?:[^\r]+\r\n)*?Transport: RTP/AVP(?:/UDP)?;(?:unicast|multicast)[^\r]*"
        rb"\r\n(?:[^\r]+\r\n)*\r\n",
        client,
    )
    assert udp_setups, "the recording starts with the client's UDP offer"
    assert machine.setups_refused == len(udp_setups)
    expected_to_camera = client
    for setup in udp_setups:
        expected_to_camera = expected_to_camera.replace(setup, b"", 1)
    assert to_camera == expected_to_camera  # byte for byte, Authorization headers included
    assert b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1" in to_camera
    refusals = re.findall(
        rb"RTSP/1.0 461 Unsupported Transport\r\nCSeq: (\d+)\r\n\r\n", to_consumer
    )
    setup_cseqs = [re.search(rb"CSeq: (\d+)", s).group(1) for s in udp_setups]  # type: ignore[union-attr]
    assert refusals == setup_cseqs
    assert re.sub(
        rb"RTSP/1.0 461 Unsupported Transport\r\nCSeq: \d+\r\n\r\n", b"", to_consumer
    ) == (camera)
    assert machine.consumer_done and machine.camera_done and not machine.stepped_aside


@pytest.mark.parametrize("name", RECORDINGS)
def test_each_461_arrives_between_the_answers_around_it(name: str) -> None:
    """The consumer sees its answers in request order: CSeqs of all answers only ever rise."""
    _, _, to_consumer = replay(name)
    cseqs = [int(c) for c in re.findall(rb"RTSP/1.0 \d{3} [^\r]*\r\nCSeq: (\d+)", to_consumer)]
    assert cseqs == sorted(cseqs) and len(cseqs) >= 4


def test_after_play_bytes_pass_without_the_machine() -> None:
    machine = RtspSteering()
    machine.from_consumer(b"PLAY rtsp://cam/test RTSP/1.0\r\nCSeq: 5\r\nSession: s\r\n\r\n")
    assert machine.consumer_done and not machine.camera_done
    rtcp = b"$\x01\x00\x04abcd"
    assert machine.from_consumer(rtcp + b"SETUP garbage").to_camera == rtcp + b"SETUP garbage"
    answer = b"RTSP/1.0 200 OK\r\nCSeq: 5\r\nSession: s\r\n\r\n"
    rtp = b"$\x00\x00\x03xyz"
    assert machine.from_camera(answer + rtp + b"tail") == answer + rtp + b"tail"
    assert machine.camera_done


def test_a_461_waits_for_the_answer_to_an_earlier_request() -> None:
    machine = RtspSteering()
    describe = b"DESCRIBE rtsp://cam/test RTSP/1.0\r\nCSeq: 2\r\n\r\n"
    setup = b"SETUP rtsp://cam/test/s0 RTSP/1.0\r\nCSeq: 3\r\nTransport: RTP/AVP;unicast\r\n\r\n"
    steered = machine.from_consumer(describe + setup)
    assert steered.to_camera == describe and steered.to_consumer == b""
    sdp = b"v=0\r\n"
    answer = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 5\r\n\r\n" + sdp
    out = machine.from_camera(answer[:30]) + machine.from_camera(answer[30:])
    assert out == answer + b"RTSP/1.0 461 Unsupported Transport\r\nCSeq: 3\r\n\r\n"


def test_a_setup_offering_udp_and_tcp_keeps_only_tcp() -> None:
    machine = RtspSteering()
    setup = (
        b"SETUP rtsp://cam/test/s0 RTSP/1.0\r\nCSeq: 3\r\n"
        b"Transport: RTP/AVP;unicast;client_port=5000-5001,RTP/AVP/TCP;unicast;interleaved=0-1\r\n"
        b'Authorization: Digest response="x"\r\n\r\n'
    )
    steered = machine.from_consumer(setup)
    assert steered.to_camera == (
        b"SETUP rtsp://cam/test/s0 RTSP/1.0\r\nCSeq: 3\r\n"
        b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n"
        b'Authorization: Digest response="x"\r\n\r\n'
    )
    assert machine.setups_rewritten == 1 and machine.setups_refused == 0


def test_a_tcp_setup_and_a_body_split_across_reads_pass_unchanged() -> None:
    machine = RtspSteering()
    request = (
        b"SET_PARAMETER rtsp://cam/test RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 12\r\n\r\n"
        b"SETUP x: y\r\n"
        b"SETUP rtsp://cam/test/s0 RTSP/1.0\r\nCSeq: 2\r\n"
        b"Transport: RTP/AVP/TCP;interleaved=0-1\r\n\r\n"
    )
    out = b"".join(
        machine.from_consumer(request[i : i + 7]).to_camera for i in range(0, len(request), 7)
    )
    assert out == request and machine.setups_refused == 0


@pytest.mark.parametrize(
    "first",
    [
        b"GET /test HTTP/1.0\r\nx-sessioncookie: abc\r\n"
        b"Accept: application/x-rtsp-tunnelled\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(300),  # a TLS ClientHello
    ],
)
def test_what_is_not_rtsp_makes_the_machine_step_aside(first: bytes) -> None:
    machine = RtspSteering()
    assert machine.from_consumer(first).to_camera == first
    assert machine.stepped_aside and machine.consumer_done and machine.camera_done
    assert (
        machine.from_camera(b"HTTP/1.0 200 OK\r\n\r\nanything")
        == b"HTTP/1.0 200 OK\r\n\r\nanything"
    )


def test_an_endless_head_makes_the_machine_step_aside() -> None:
    machine = RtspSteering()
    line = b"OPTIONS rtsp://cam/test RTSP/1.0\r\n"
    assert machine.from_consumer(line).to_camera == b""
    padding = b"X-Pad: " + b"a" * 20_000
    assert machine.from_consumer(padding).to_camera == line + padding
    assert machine.stepped_aside
