"""The pure parts of ``tunnel_agent.rtsp``: SDP, RTP, depacketisers, parameter sets, Digest, the
interleaved framer. RTP packets are built here (``tests/support/rtp.py``)."""

from __future__ import annotations

import base64
import os
from fractions import Fraction

import av
import pytest

from tests.support.rtp import Packetizer
from tunnel_agent.rtsp.auth import Credentials, digest_authorization, parse_challenges
from tunnel_agent.rtsp.codec_info import aac_config, h264_picture, h265_picture
from tunnel_agent.rtsp.depacketize import (
    AacDepacketizer,
    AudioAccessUnit,
    H264Depacketizer,
    H265Depacketizer,
    VideoAccessUnit,
)
from tunnel_agent.rtsp.errors import RtspAuthFailed, RtspProtocolError
from tunnel_agent.rtsp.messages import Framer, Response, parse_rtp_info, parse_session
from tunnel_agent.rtsp.rtp import Timeline, parse_rtp
from tunnel_agent.rtsp.sdp import base64_list, control_url, parse_sdp

# What the test camera (gst-rtsp-server, x264enc, rtph264pay) describes at 640x360.
CAMERA_SDP = """v=0\r
o=- 1188340656180883 1 IN IP4 127.0.0.1\r
s=Session streamed with GStreamer\r
t=0 0\r
a=tool:GStreamer\r
a=type:broadcast\r
a=control:*\r
a=range:npt=now-\r
m=video 0 RTP/AVP 96\r
c=IN IP4 0.0.0.0\r
a=rtpmap:96 H264/90000\r
a=framerate:15\r
a=fmtp:96 packetization-mode=1;sprop-parameter-sets=Z0LAFtoCgL/lwFqDAwNSgAAAAwCAAAAPR4sXUA==,\
aM48gA==;profile-level-id=42c016;level-asymmetry-allowed=1\r
a=control:stream=0\r
m=audio 0 RTP/AVP 97\r
c=IN IP4 0.0.0.0\r
a=rtpmap:97 MPEG4-GENERIC/48000/1\r
a=fmtp:97 streamtype=5;profile-level-id=2;mode=AAC-hbr;config=1188;sizelength=13;\
indexlength=3;indexdeltalength=3\r
a=control:stream=1\r
"""
CAMERA_SPS = base64.b64decode("Z0LAFtoCgL/lwFqDAwNSgAAAAwCAAAAPR4sXUA==")


# -- SDP ----------------------------------------------------------------------------------------


def test_sdp_gives_each_media_its_codec_clock_parameters_and_control() -> None:
    sdp = parse_sdp(CAMERA_SDP)

    video, audio = sdp.media
    assert sdp.control == "*"
    assert (video.kind, video.payload_type, video.encoding, video.clock_rate) == (
        "video",
        96,
        "H264",
        90000,
    )
    assert video.fmtp["packetization-mode"] == "1" and video.control == "stream=0"
    assert base64_list(video.fmtp["sprop-parameter-sets"]) == [CAMERA_SPS, b"\x68\xce\x3c\x80"]
    assert (audio.encoding, audio.clock_rate, audio.channels) == ("MPEG4-GENERIC", 48000, 1)
    assert audio.fmtp["sizelength"] == "13" and audio.fmtp["config"] == "1188"


def test_sdp_without_media_or_with_a_broken_media_line_is_refused() -> None:
    with pytest.raises(RtspProtocolError, match="no media"):
        parse_sdp("v=0\r\ns=nothing\r\n")
    with pytest.raises(RtspProtocolError, match="malformed media line"):
        parse_sdp("v=0\r\nm=video 0\r\n")


def test_control_urls_resolve_against_the_base() -> None:
    base = "rtsp://127.0.0.1:554/test/"
    assert control_url(base, "stream=0") == "rtsp://127.0.0.1:554/test/stream=0"
    assert control_url("rtsp://h/test", "trackID=1") == "rtsp://h/test/trackID=1"
    assert control_url(base, "*") == base and control_url(base, None) == base
    assert control_url(base, "rtsp://other/x") == "rtsp://other/x"


def test_session_and_rtp_info_headers() -> None:
    assert parse_session("6BVp2XzkmNK0gJC9;timeout=60") == ("6BVp2XzkmNK0gJC9", 60.0)
    assert parse_session("abc") == ("abc", None)
    info = (
        "url=rtsp://h/test/stream=0;seq=7;rtptime=4000000000, url=rtsp://h/test/stream=1;rtptime=5"
    )
    assert parse_rtp_info(info) == {
        "rtsp://h/test/stream=0": 4000000000,
        "rtsp://h/test/stream=1": 5,
    }


# -- RTP ----------------------------------------------------------------------------------------


def test_rtp_header_with_csrcs_extension_and_padding() -> None:
    payload = b"\x65hello"
    packet = (
        bytes([0x80 | 0x20 | 0x10 | 2, 0x80 | 96])  # padding, extension, 2 CSRCs; marker
        + (513).to_bytes(2, "big")
        + (90000).to_bytes(4, "big")
        + bytes(4)  # SSRC
        + bytes(8)  # 2 CSRCs
        + b"\xbe\xde\x00\x01"
        + bytes(4)  # one extension word
        + payload
        + b"\x00\x00\x03"  # 3 bytes of padding
    )
    sequence, timestamp, marker, start, end = parse_rtp(packet) or (0, 0, False, 0, 0)
    assert (sequence, timestamp, marker) == (513, 90000, True)
    assert packet[start:end] == payload
    assert parse_rtp(b"\x40" + bytes(11)) is None  # version 1
    assert parse_rtp(b"\x80\x60") is None


def test_timeline_extends_timestamps_across_the_wrap_and_counts_from_the_reference() -> None:
    timeline = Timeline()
    timeline.set_reference(2**32 - 3000)
    assert [timeline.extend(t) for t in (2**32 - 3000, 2**32 - 1, 3000, 6000)] == [
        0,
        2999,
        6000,
        9000,
    ]
    assert timeline.extend(2999) == 5999  # a late packet goes back, it does not wrap forward


def test_timeline_sequence_sees_gaps_late_packets_and_the_wrap() -> None:
    timeline = Timeline()
    assert [timeline.sequence(s) for s in (65534, 65535, 0, 3, 2, 4)] == [0, 0, 0, 2, -2, 0]


# -- H.264 --------------------------------------------------------------------------------------

SPS, PPS = CAMERA_SPS, b"\x68\xce\x3c\x80"


def idr(size: int) -> bytes:
    return b"\x65" + os.urandom(size - 1)


def non_idr(size: int) -> bytes:
    return b"\x41" + os.urandom(size - 1)


def h264_collect(**kwargs: object) -> tuple[H264Depacketizer, list[VideoAccessUnit]]:
    units: list[VideoAccessUnit] = []
    return H264Depacketizer(units.append, **kwargs), units  # type: ignore[arg-type]


def test_h264_single_units_aggregates_and_fragments_make_whole_access_units() -> None:
    depacketizer, out = h264_collect()
    rtp = Packetizer(max_payload_bytes=1000)
    first = [SPS, PPS, idr(5000)]
    second = [non_idr(300)]
    third = [non_idr(80), non_idr(90)]  # two slices: one STAP-A
    packets = rtp.video(first, 1000) + rtp.video(second, 7000) + rtp.video(third, 13000)
    assert len(packets) > 6  # STAP-A (SPS, PPS) + FU-A fragments + single + STAP-A
    for packet in packets:
        depacketizer.push(memoryview(packet))

    assert [u.units for u in out] == [first, second, third]
    assert [u.keyframe for u in out] == [True, False, False]
    assert [u.timestamp for u in out] == [0, 6000, 12000]
    assert depacketizer.parameter_sets == {7: SPS, 8: PPS}


def test_h264_a_frame_without_marker_ends_when_the_timestamp_changes() -> None:
    depacketizer, out = h264_collect()
    rtp = Packetizer()
    depacketizer.push(rtp.packet(idr(50), 0, False))
    depacketizer.push(rtp.packet(non_idr(40), 3000, True))
    assert [(u.timestamp, u.keyframe) for u in out] == [(0, True), (3000, False)]


def test_h264_a_lost_packet_drops_frames_up_to_the_next_keyframe() -> None:
    depacketizer, out = h264_collect()
    rtp = Packetizer(max_payload_bytes=500)
    frames = [[SPS, PPS, idr(2000)], [non_idr(1500)], [non_idr(1500)], [non_idr(200)]]
    frames += [[SPS, PPS, idr(2000)], [non_idr(300)]]
    for index, frame in enumerate(frames):
        packets = rtp.video(frame, index * 6000)
        if index == 1:
            del packets[1]  # a middle fragment of the second frame is lost
        for packet in packets:
            depacketizer.push(packet)

    assert [u.timestamp for u in out] == [0, 24000, 30000]
    assert out[1].keyframe and out[1].units == frames[4]
    assert depacketizer.frames_dropped == 3


def test_h264_losing_a_fragment_start_or_a_whole_frame_is_seen() -> None:
    depacketizer, out = h264_collect()
    rtp = Packetizer(max_payload_bytes=500)
    for packet in rtp.video([idr(1000)], 0):
        depacketizer.push(packet)
    packets = rtp.video([non_idr(1000)], 3000)
    for packet in packets[1:]:  # its FU-A start is lost
        depacketizer.push(packet)
    rtp.video([non_idr(100)], 6000)  # a whole frame lost: only the sequence number shows it
    for packet in rtp.video([non_idr(100)], 9000):
        depacketizer.push(packet)
    assert [u.timestamp for u in out] == [0]


def test_h264_repeated_packets_are_ignored() -> None:
    depacketizer, out = h264_collect()
    rtp = Packetizer()
    packet = rtp.video([idr(100)], 0)[0]
    depacketizer.push(packet)
    depacketizer.push(packet)
    assert len(out) == 1 and depacketizer.packets_ignored == 1


def test_h264_timestamps_and_sequence_numbers_wrap() -> None:
    depacketizer, out = h264_collect()
    rtp = Packetizer(sequence=65530, max_payload_bytes=400)
    start = 2**32 - 9000
    for index in range(6):
        frame = [SPS, PPS, idr(1000)] if index == 0 else [non_idr(700)]
        for packet in rtp.video(frame, start + index * 6000):
            depacketizer.push(packet)
    assert [u.timestamp for u in out] == [i * 6000 for i in range(6)]
    assert depacketizer.frames_dropped == 0


def test_h264_parameter_sets_come_from_the_sdp_and_then_in_band() -> None:
    sdp = parse_sdp(CAMERA_SDP)
    out: list[VideoAccessUnit] = []
    depacketizer = H264Depacketizer.from_sdp(sdp.media[0], out.append)
    assert depacketizer.parameter_sets == {7: SPS, 8: PPS}
    newer = b"\x68\xce\x38\x80"
    for packet in Packetizer().video([newer, idr(100)], 0):
        depacketizer.push(packet)
    assert depacketizer.parameter_sets[8] == newer


# -- H.265 --------------------------------------------------------------------------------------


def hevc_unit(kind: int, size: int) -> bytes:
    return bytes([kind << 1, 1]) + os.urandom(size - 2)


def test_h265_single_units_aggregates_and_fragments() -> None:
    out: list[VideoAccessUnit] = []
    depacketizer = H265Depacketizer(out.append)
    rtp = Packetizer(max_payload_bytes=800)
    vps, sps, pps = hevc_unit(32, 24), hevc_unit(33, 40), hevc_unit(34, 8)
    keyframe = [vps, sps, pps, hevc_unit(19, 4000)]  # IDR_W_RADL
    later = [hevc_unit(1, 500)]
    for packet in rtp.video(keyframe, 100, hevc=True) + rtp.video(later, 3100, hevc=True):
        depacketizer.push(packet)

    assert [u.units for u in out] == [keyframe, later]
    assert [u.keyframe for u in out] == [True, False] and out[1].timestamp == 3000
    assert depacketizer.parameter_sets == {32: vps, 33: sps, 34: pps}


def test_h265_loss_waits_for_the_next_keyframe() -> None:
    out: list[VideoAccessUnit] = []
    depacketizer = H265Depacketizer(out.append)
    rtp = Packetizer(max_payload_bytes=300)
    frames = [[hevc_unit(19, 900)], [hevc_unit(1, 900)], [hevc_unit(1, 100)], [hevc_unit(21, 600)]]
    for index, frame in enumerate(frames):
        packets = rtp.video(frame, index * 3000, hevc=True)
        for position, packet in enumerate(packets):
            if (index, position) != (1, 2):
                depacketizer.push(packet)
    assert [u.timestamp for u in out] == [0, 9000]


# -- AAC ----------------------------------------------------------------------------------------


def test_aac_access_units_from_au_headers_each_with_its_timestamp() -> None:
    out: list[AudioAccessUnit] = []
    sdp = parse_sdp(CAMERA_SDP)
    depacketizer = AacDepacketizer.from_sdp(sdp.media[1], out.append)
    rtp = Packetizer(payload_type=97)
    frames = [os.urandom(170), os.urandom(181), os.urandom(9)]
    depacketizer.push(rtp.aac(frames, 2**32 - 1024))
    depacketizer.push(rtp.aac([b"x" * 12], 2048))

    assert [u.data for u in out] == [*frames, b"x" * 12]
    assert [u.timestamp for u in out] == [0, 1024, 2048, 3072]


def test_aac_a_frame_larger_than_a_packet_is_joined_from_its_fragments() -> None:
    out: list[AudioAccessUnit] = []
    depacketizer = AacDepacketizer(out.append)
    rtp = Packetizer(payload_type=97)
    frame = os.urandom(3000)
    header = (16).to_bytes(2, "big") + (len(frame) << 3).to_bytes(2, "big")
    depacketizer.push(rtp.packet(header + frame[:1400], 0, False))
    depacketizer.push(rtp.packet(header + frame[1400:2800], 0, False))
    depacketizer.push(rtp.packet(header + frame[2800:], 0, True))
    assert [u.data for u in out] == [frame]

    depacketizer.push(rtp.packet(header + frame[:1400], 1024, False))
    rtp.sequence += 1  # the middle fragment is lost
    depacketizer.push(rtp.packet(header + frame[2800:], 1024, True))
    assert len(out) == 1


def test_audio_specific_config() -> None:
    config = aac_config(bytes.fromhex("1188"))  # the test camera's
    assert (config.object_type, config.sample_rate, config.channels) == (2, 48000, 1)
    config = aac_config(bytes.fromhex("1210"))
    assert (config.object_type, config.sample_rate, config.channels) == (2, 44100, 2)


# -- SPS sizes ----------------------------------------------------------------------------------


def test_the_camera_sps_says_640x360() -> None:
    picture = h264_picture(CAMERA_SPS)
    assert (picture.width, picture.height, picture.chroma_format, picture.bit_depth) == (
        640,
        360,
        1,
        8,
    )


def encoded_parameter_sets(codec: str, width: int, height: int) -> list[bytes]:
    """Parameter sets of one frame from a real encoder (x264, x265), Annex B split."""
    context = av.CodecContext.create(codec, "w")
    assert isinstance(context, av.VideoCodecContext)
    context.width, context.height, context.pix_fmt = width, height, "yuv420p"
    context.time_base = Fraction(1, 25)
    if codec == "libx264":
        context.options = {"preset": "ultrafast", "profile": "high"}
    else:
        context.options = {"preset": "ultrafast", "x265-params": "log-level=error"}
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes([128]) * plane.buffer_size)
    frame.pts = 0
    data = b"".join(bytes(p) for p in [*context.encode(frame), *context.encode(None)])
    return [u for u in data.split(b"\x00\x00\x01") if u.strip(b"\x00")]


@pytest.mark.parametrize("size", [(640, 360), (1920, 1080), (1280, 720), (320, 240)])
def test_sps_sizes_from_real_encoders(size: tuple[int, int]) -> None:
    h264 = next(u for u in encoded_parameter_sets("libx264", *size) if u[0] & 0x1F == 7)
    h265 = next(u for u in encoded_parameter_sets("libx265", *size) if (u[0] >> 1) & 0x3F == 33)

    picture = h264_picture(h264.rstrip(b"\x00"))
    assert (picture.width, picture.height) == size and picture.chroma_format == 1
    picture = h265_picture(h265.rstrip(b"\x00"))
    assert (picture.width, picture.height, picture.bit_depth) == (*size, 8)


def test_a_truncated_sps_is_refused() -> None:
    with pytest.raises(RtspProtocolError, match="ends early"):
        h264_picture(CAMERA_SPS[:6])


# -- authentication -----------------------------------------------------------------------------


RFC_2617_CHALLENGE = {
    "realm": "testrealm@host.com",
    "qop": "auth,auth-int",
    "nonce": "dcd98b7102dd2f0e8b11d0f600bfb0c093",
    "opaque": "5ccc069c403ebaf9f0171e9517f40e41",
}
RFC_7616_CHALLENGE = {
    "realm": "http-auth@example.org",
    "qop": "auth, auth-int",
    "algorithm": "SHA-256",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
}


@pytest.mark.parametrize(
    ("challenge", "password", "cnonce", "response"),
    [
        (RFC_2617_CHALLENGE, "Circle Of Life", "0a4f113b", "6629fae49393a05397450978507c4ef1"),
        (
            RFC_7616_CHALLENGE,
            "Circle of Life",
            "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
        ),
    ],
    ids=["rfc2617-md5", "rfc7616-sha256"],
)
def test_digest_answers_match_the_rfc_examples(
    challenge: dict[str, str], password: str, cnonce: str, response: str
) -> None:
    answer = digest_authorization(
        challenge,
        username="Mufasa",
        password=password,
        method="GET",
        uri="/dir/index.html",
        count=1,
        cnonce=cnonce,
    )
    assert f'response="{response}"' in answer
    assert "qop=auth" in answer and "nc=00000001" in answer
    assert f'opaque="{challenge["opaque"]}"' in answer


def test_credentials_prefer_digest_and_never_show_the_password() -> None:
    headers = ['Basic realm="cam"', 'Digest realm="cam", nonce="abc", stale=FALSE']
    assert [c.scheme for c in parse_challenges(headers)] == ["basic", "digest"]
    credentials = Credentials("viewer", "s3cret-pass")
    credentials.accept(headers)
    answer = credentials.authorization("DESCRIBE", "rtsp://127.0.0.1/test")
    assert answer.startswith("Digest ") and "s3cret-pass" not in answer
    assert "s3cret-pass" not in repr(credentials)
    credentials.accept(['Basic realm="cam"'])
    expected = base64.b64encode(b"viewer:s3cret-pass").decode()
    assert credentials.authorization("DESCRIBE", "x") == f"Basic {expected}"
    with pytest.raises(RtspAuthFailed, match="scheme"):
        credentials.accept(['Negotiate realm="x"'])


# -- the interleaved framer ---------------------------------------------------------------------


def test_framer_splits_answers_and_packets_across_any_chunking() -> None:
    answer = b"RTSP/1.0 200 OK\r\nCSeq: 3\r\nContent-Length: 4\r\n\r\nbody"
    packets = [b"$\x00" + len(p).to_bytes(2, "big") + p for p in (b"a" * 1400, b"b" * 7)]
    stream = packets[0] + answer + packets[1] + b"$\x01\x00\x02rc"
    for chunk_bytes in (1, 3, 7, 100, len(stream)):
        got: list[tuple[int, bytes]] = []
        answers: list[Response] = []

        def take(channel: int, packet: memoryview, into: list[tuple[int, bytes]] = got) -> None:
            into.append((channel, bytes(packet)))

        framer = Framer(take, answers.append)
        for start in range(0, len(stream), chunk_bytes):
            framer.feed(stream[start : start + chunk_bytes])
        assert got == [(0, b"a" * 1400), (0, b"b" * 7), (1, b"rc")]
        assert [(a.status, a.header("cseq"), a.body) for a in answers] == [(200, "3", b"body")]


def test_framer_refuses_bytes_that_are_not_rtsp() -> None:
    framer = Framer(lambda c, p: None, lambda r: None)
    with pytest.raises(RtspProtocolError, match="not RTSP"):
        framer.feed(b"\x00\x01garbage")
