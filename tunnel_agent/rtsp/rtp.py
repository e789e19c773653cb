"""RTP packets (RFC 3550) as depacketisers need them: header fields, the payload's place, sequence
gaps and 32-bit timestamps extended so that they never wrap. Pure code."""

from __future__ import annotations

import struct

RTP_VERSION = 2
MIN_HEADER_BYTES = 12
SEQUENCE_MODULO = 1 << 16
TIMESTAMP_MODULO = 1 << 32
_HEADER = struct.Struct(">BBHI")


def parse_rtp(packet: memoryview | bytes) -> tuple[int, int, bool, int, int] | None:
    """(sequence, timestamp, marker, payload start, payload end), or None for a malformed packet."""
    size = len(packet)
    if size < MIN_HEADER_BYTES:
        return None
    first, second, sequence, timestamp = _HEADER.unpack_from(packet)
    if first >> 6 != RTP_VERSION:
        return None
    start = MIN_HEADER_BYTES + 4 * (first & 0x0F)
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if start + 4 > size:
            return None
        start += 4 + 4 * ((packet[start + 2] << 8) | packet[start + 3])
    end = size - packet[size - 1] if first & 0x20 else size
    if start > end:
        return None
    return sequence, timestamp, bool(second & 0x80), start, end


class Timeline:
    """Sequence continuity and extended timestamps of one RTP stream.

    Timestamps count from ``reference`` (the ``rtptime`` of the PLAY answer's RTP-Info when the
    camera sends it, so that all streams count from the same instant; else the first packet's)
    and keep growing across the 32-bit wrap.
    """

    __slots__ = ("_expected", "_last", "_last_raw", "_referenced")

    def __init__(self) -> None:
        self._expected: int | None = None
        self._last_raw = 0
        self._last = 0
        self._referenced = False

    def set_reference(self, rtptime: int) -> None:
        self._last_raw = rtptime % TIMESTAMP_MODULO
        self._last = 0
        self._referenced = True

    def sequence(self, sequence: int) -> int:
        """How this packet follows the last: 0 in order, > 0 packets lost, < 0 late or repeated."""
        expected = self._expected
        if expected is None:
            self._expected = (sequence + 1) % SEQUENCE_MODULO
            return 0
        half = SEQUENCE_MODULO // 2
        delta = (sequence - expected + half) % SEQUENCE_MODULO - half
        if delta >= 0:
            self._expected = (sequence + 1) % SEQUENCE_MODULO
        return delta

    def extend(self, timestamp: int) -> int:
        if not self._referenced:
            self.set_reference(timestamp)
        delta = (timestamp - self._last_raw + TIMESTAMP_MODULO // 2) % TIMESTAMP_MODULO
        self._last += delta - TIMESTAMP_MODULO // 2
        self._last_raw = timestamp
        return self._last
