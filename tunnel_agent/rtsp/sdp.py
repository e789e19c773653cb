"""The parts of an SDP (RFC 8866) that an RTSP reader needs: per media its payload type, codec,
clock rate, format parameters and control URL. Pure code."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from tunnel_agent.rtsp.errors import RtspProtocolError


@dataclass(frozen=True)
class MediaDescription:
    kind: str  # "video", "audio", ...
    payload_type: int
    encoding: str  # upper case, as in a=rtpmap: "H264", "H265", "MPEG4-GENERIC"
    clock_rate: int
    channels: int | None = None
    fmtp: dict[str, str] = field(default_factory=dict)  # keys in lower case
    control: str | None = None


@dataclass(frozen=True)
class SessionDescription:
    media: list[MediaDescription]
    control: str | None = None


def parse_sdp(text: str) -> SessionDescription:
    """The session's media; an SDP without any ``m=`` line is refused."""
    session_control: str | None = None
    blocks: list[dict[str, object]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) < 4:
                raise RtspProtocolError(f"the camera's SDP has a malformed media line: {value!r}")
            blocks.append({"kind": parts[0], "formats": parts[3:], "rtpmap": {}, "fmtp": {}})
        elif kind == "a":
            name, _, attribute = value.partition(":")
            if not blocks:
                if name == "control":
                    session_control = attribute.strip()
                continue
            block = blocks[-1]
            if name == "control":
                block["control"] = attribute.strip()
            elif name in ("rtpmap", "fmtp"):
                payload_type, _, rest = attribute.strip().partition(" ")
                table = block[name]
                assert isinstance(table, dict)
                table[payload_type] = rest.strip()
    if not blocks:
        raise RtspProtocolError("the camera's SDP describes no media")
    return SessionDescription([_media(b) for b in blocks], session_control)


def _media(block: dict[str, object]) -> MediaDescription:
    formats = block["formats"]
    rtpmaps = block["rtpmap"]
    fmtps = block["fmtp"]
    assert isinstance(formats, list) and isinstance(rtpmaps, dict) and isinstance(fmtps, dict)
    first = str(formats[0])
    try:
        payload_type = int(first)
    except ValueError:
        raise RtspProtocolError(f"the camera's SDP has a non-RTP format {first!r}") from None
    encoding, clock_rate, channels = "", 0, None
    rtpmap = rtpmaps.get(first)
    if rtpmap:
        pieces = rtpmap.split("/")
        encoding = pieces[0].upper()
        try:
            clock_rate = int(pieces[1]) if len(pieces) > 1 else 0
            channels = int(pieces[2]) if len(pieces) > 2 else None
        except ValueError:
            raise RtspProtocolError(f"the camera's SDP has a bad rtpmap {rtpmap!r}") from None
    control = block.get("control")
    return MediaDescription(
        str(block["kind"]),
        payload_type,
        encoding,
        clock_rate,
        channels,
        parse_fmtp(fmtps.get(first, "")),
        str(control) if control is not None else None,
    )


def parse_fmtp(text: str) -> dict[str, str]:
    """``a=fmtp`` parameters (``key=value;...``), keys in lower case (they are case-blind)."""
    parameters: dict[str, str] = {}
    for item in text.split(";"):
        key, _, value = item.strip().partition("=")
        if key:
            parameters[key.strip().lower()] = value.strip()
    return parameters


def control_url(base: str, control: str | None) -> str:
    """Where to send SETUP for a media: its ``a=control`` resolved against the base URL."""
    if not control or control == "*":
        return base
    if control.lower().startswith(("rtsp://", "rtsps://")):
        return control
    return base.rstrip("/") + "/" + control.lstrip("/")


def base64_list(value: str | None) -> list[bytes]:
    """Parameter sets from ``sprop-parameter-sets`` and the like (comma-separated base64)."""
    units: list[bytes] = []
    for item in (value or "").split(","):
        text = item.strip()
        if not text:
            continue
        try:
            units.append(base64.b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError):
            raise RtspProtocolError("the camera's SDP carries malformed parameter sets") from None
    return [u for u in units if u]
