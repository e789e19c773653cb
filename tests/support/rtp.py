"""RTP packets built in tests: the packetisation the camera side does (RFC 6184, 7798, 3640), so
depacketisers can be fed single units, aggregates, fragments, gaps and timestamp wraps."""

from __future__ import annotations

import struct
from collections.abc import Sequence


class Packetizer:
    def __init__(
        self,
        *,
        payload_type: int = 96,
        sequence: int = 0,
        ssrc: int = 0x1234_5678,
        max_payload_bytes: int = 1200,
    ) -> None:
        self.payload_type = payload_type
        self.sequence = sequence
        self.ssrc = ssrc
        self.max_payload_bytes = max_payload_bytes

    def packet(self, payload: bytes, timestamp: int, marker: bool) -> bytes:
        header = struct.pack(
            ">BBHII",
            0x80,
            (0x80 if marker else 0) | self.payload_type,
            self.sequence % 65536,
            timestamp % (1 << 32),
            self.ssrc,
        )
        self.sequence += 1
        return header + payload

    def video(self, units: Sequence[bytes], timestamp: int, *, hevc: bool = False) -> list[bytes]:
        """One access unit: small neighbours aggregated (STAP-A / AP), big ones fragmented."""
        payloads: list[bytes] = []
        group: list[bytes] = []
        header_bytes = 2 if hevc else 1
        limit = self.max_payload_bytes

        def close_group() -> None:
            if len(group) == 1:
                payloads.append(group[0])
            elif group:
                head = (
                    bytes([(48 << 1) | (group[0][0] & 0x81), group[0][1]])
                    if hevc
                    else bytes([(group[0][0] & 0xE0) | 24])
                )
                payloads.append(head + b"".join(struct.pack(">H", len(u)) + u for u in group))
            group.clear()

        for unit in units:
            if len(unit) > limit:
                close_group()
                payloads += fragments(unit, limit, hevc=hevc)
                continue
            if sum(2 + len(u) for u in group) + 2 + len(unit) + header_bytes > limit:
                close_group()
            group.append(unit)
        close_group()
        return [
            self.packet(p, timestamp, index == len(payloads) - 1)
            for index, p in enumerate(payloads)
        ]

    def aac(self, frames: Sequence[bytes], timestamp: int) -> bytes:
        """Several AAC frames in one packet: AU-hbr headers (13-bit size, 3-bit index)."""
        headers = b"".join(struct.pack(">H", len(f) << 3) for f in frames)
        payload = struct.pack(">H", 16 * len(frames)) + headers + b"".join(frames)
        return self.packet(payload, timestamp, True)


def fragments(unit: bytes, limit: int, *, hevc: bool = False) -> list[bytes]:
    """FU-A (H.264) or FU (H.265) payloads of one NAL unit."""
    if hevc:
        kind = (unit[0] >> 1) & 0x3F
        head = bytes([(49 << 1) | (unit[0] & 0x81), unit[1]])
        body = unit[2:]
    else:
        kind = unit[0] & 0x1F
        head = bytes([(unit[0] & 0xE0) | 28])
        body = unit[1:]
    step = limit - len(head) - 1
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    out = []
    for index, piece in enumerate(pieces):
        flags = (0x80 if index == 0 else 0) | (0x40 if index == len(pieces) - 1 else 0)
        out.append(head + bytes([flags | kind]) + piece)
    return out
