"""The RTP packetisers and the SDP they announce, checked against the project's depacketisers and
SDP parser (pure code, no sockets)."""

from __future__ import annotations

import base64
import struct

import pytest

from tunnel_agent.rtsp.depacketize import (
    H264Depacketizer,
    H265Depacketizer,
    VideoAccessUnit,
)
from tunnel_agent.rtsp.packetize import (
    MAX_RTP_PACKET_BYTES,
    UnsupportedStream,
    VideoFormat,
    VideoPacketizer,
    annexb_units,
    length_prefixed_units,
    media_description,
    session_description,
)
from tunnel_agent.rtsp.rtp import parse_rtp
from tunnel_agent.rtsp.sdp import base64_list, parse_sdp

H264_SPS = bytes.fromhex("6742c01e8c8d40a02ff2c0")
H264_PPS = bytes.fromhex("68ce3c80")
H264_IDR = b"\x65" + bytes(range(256)) * 20  # 5,121 bytes: four fragments
H264_SLICE = b"\x41" + b"\x9a" * 300
H265_VPS = bytes.fromhex("40010c01ffff016000000300b0000003000003005dac09")
H265_SPS = bytes.fromhex("420101016000000300b0000003000003005da00280802d1659")
H265_PPS = bytes.fromhex("4401c172b46240")
H265_IDR = b"\x26\x01" + bytes(range(256)) * 12


def frames_of(wire: bytes) -> list[tuple[int, bytes]]:
    """(channel, RTP packet) of each interleaved frame, checking that they tile the bytes."""
    frames, position = [], 0
    while position < len(wire):
        assert wire[position] == 0x24
        channel, length = wire[position + 1], struct.unpack_from(">H", wire, position + 2)[0]
        frames.append((channel, wire[position + 4 : position + 4 + length]))
        position += 4 + length
    assert position == len(wire)
    return frames


def round_trip(
    codec: str, access_units: list[tuple[list[bytes], int]]
) -> tuple[list[VideoAccessUnit], list[bytes]]:
    packetizer = VideoPacketizer(codec, channel=0, sequence=65_534, ssrc=0x1234)
    pieces: list[bytes | memoryview] = []
    for units, timestamp in access_units:
        packetizer.packetize(units, timestamp, pieces)
    wire = b"".join(pieces)
    packets = [packet for _, packet in frames_of(wire)]
    assert packetizer.packets == len(packets)
    got: list[VideoAccessUnit] = []
    depacketizer = (H264Depacketizer if codec == "h264" else H265Depacketizer)(got.append)
    for packet in packets:
        depacketizer.push(packet)
    assert depacketizer.frames_dropped == 0 and depacketizer.packets_ignored == 0
    return got, packets


def test_h264_units_go_whole_or_in_fu_a_fragments_and_come_back_the_same() -> None:
    keyframe = [H264_SPS, H264_PPS, H264_IDR]
    got, packets = round_trip("h264", [(keyframe, 90_000), ([H264_SLICE], 93_600)])
    assert [unit.units for unit in got] == [keyframe, [H264_SLICE]]
    assert [unit.keyframe for unit in got] == [True, False]
    assert got[1].timestamp - got[0].timestamp == 3_600
    assert len(packets) == 2 + 4 + 1  # SPS, PPS whole; the IDR in four; the slice whole
    assert all(len(packet) <= MAX_RTP_PACKET_BYTES for packet in packets)
    headers = [parse_rtp(packet) for packet in packets]
    assert [h[0] for h in headers if h] == [65_534, 65_535, 0, 1, 2, 3, 4]  # sequence wraps
    assert [h[2] for h in headers if h] == [False] * 5 + [True, True]  # marker: last of each
    assert {struct.unpack_from(">I", p, 8)[0] for p in packets} == {0x1234}
    assert {p[1] & 0x7F for p in packets} == {96}
    fragments = [p for p in packets if p[12] & 0x1F == 28]
    assert [p[13] & 0xC0 for p in fragments] == [0x80, 0, 0, 0x40]  # start ... end
    assert {p[13] & 0x1F for p in fragments} == {5}


def test_h265_units_go_whole_or_in_fu_fragments_and_come_back_the_same() -> None:
    keyframe = [H265_VPS, H265_SPS, H265_PPS, H265_IDR]
    got, packets = round_trip("h265", [(keyframe, 2**32 - 1_000), (keyframe, 2_600)])
    assert [unit.units for unit in got] == [keyframe, keyframe]
    assert all(unit.keyframe for unit in got)
    assert got[1].timestamp - got[0].timestamp == 3_600  # across the 32-bit wrap
    fragments = [p for p in packets if (p[12] >> 1) & 0x3F == 49]
    assert len(fragments) == 2 * 3 and {p[14] & 0x3F for p in fragments} == {19}


def test_nal_units_are_found_after_start_codes_and_length_prefixes() -> None:
    annexb = b"\0\0\0\1" + H264_SPS + b"\0\0\1" + H264_PPS + b"\0\0\0\1" + H264_SLICE
    assert [bytes(u) for u in annexb_units(annexb)] == [H264_SPS, H264_PPS, H264_SLICE]
    prefixed = b"".join(len(u).to_bytes(4, "big") + u for u in (H264_SPS, H264_SLICE))
    assert [bytes(u) for u in length_prefixed_units(prefixed, 4)] == [H264_SPS, H264_SLICE]
    with pytest.raises(UnsupportedStream, match="do not add up"):
        length_prefixed_units(prefixed[:-1], 4)


def test_parameter_sets_come_from_avcc_hvcc_or_annex_b_extradata() -> None:
    avcc = (
        bytes([1, 0x42, 0xC0, 0x1E, 0xFF, 0xE1])
        + len(H264_SPS).to_bytes(2, "big")
        + H264_SPS
        + b"\x01"
        + len(H264_PPS).to_bytes(2, "big")
        + H264_PPS
    )
    video = VideoFormat.from_extradata("h264", avcc)
    assert (video.length_size, video.parameter_sets) == (4, [H264_SPS, H264_PPS])
    annexb = VideoFormat.from_extradata("h264", b"\0\0\0\1" + H264_SPS + b"\0\0\0\1" + H264_PPS)
    assert (annexb.length_size, annexb.parameter_sets) == (0, [H264_SPS, H264_PPS])

    arrays = b"".join(
        bytes([0x80 | kind, 0, 1]) + len(unit).to_bytes(2, "big") + unit
        for kind, unit in ((32, H265_VPS), (33, H265_SPS), (34, H265_PPS))
    )
    hvcc = bytes([1]) + bytes(20) + bytes([0x0F, 3]) + arrays
    video = VideoFormat.from_extradata("hevc", hvcc)
    assert (video.codec, video.length_size) == ("h265", 4)
    assert video.parameter_sets == [H265_VPS, H265_SPS, H265_PPS]

    with pytest.raises(UnsupportedStream, match="cannot re-stream mjpeg"):
        VideoFormat.from_extradata("mjpeg", None)


def test_parameter_sets_found_in_the_stream_and_put_before_keyframes_that_lack_them() -> None:
    video = VideoFormat.from_extradata("h264", None)
    assert not video.complete
    video.remember(annexb_units(b"\0\0\1" + H264_SPS + b"\0\0\1" + H264_PPS + b"\0\0\1\x65x"))
    assert video.complete
    bare = annexb_units(b"\0\0\1\x65idr")
    assert [bytes(u) for u in video.with_parameter_sets(bare, keyframe=True)] == [
        H264_SPS,
        H264_PPS,
        b"\x65idr",
    ]
    delta = annexb_units(b"\0\0\1\x41p")
    assert video.with_parameter_sets(delta, keyframe=False) is delta


def test_the_sdp_announces_codec_parameter_sets_and_track() -> None:
    h264 = VideoFormat("h264", 0, [H264_SPS, H264_PPS])
    sdp = parse_sdp(session_description(media_description(h264, "streamid=0"), "0.0.0.0"))
    (media,) = sdp.media
    assert (media.kind, media.encoding, media.clock_rate, media.payload_type) == (
        "video",
        "H264",
        90_000,
        96,
    )
    assert media.control == "streamid=0"
    assert media.fmtp["packetization-mode"] == "1"
    assert media.fmtp["profile-level-id"] == "42c01e"
    assert base64_list(media.fmtp["sprop-parameter-sets"]) == [H264_SPS, H264_PPS]

    h265 = VideoFormat("h265", 0, [H265_VPS, H265_SPS, H265_PPS])
    (media,) = parse_sdp(session_description(media_description(h265, "streamid=0"), "::")).media
    assert media.encoding == "H265"
    assert [base64.b64decode(media.fmtp[k]) for k in ("sprop-vps", "sprop-sps", "sprop-pps")] == [
        H265_VPS,
        H265_SPS,
        H265_PPS,
    ]
    with pytest.raises(UnsupportedStream, match="not known yet"):
        media_description(VideoFormat("h264", 0, [H264_SPS]), "streamid=0")
