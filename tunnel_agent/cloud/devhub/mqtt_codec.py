"""MQTT 3.1.1 packets as bytes, with no I/O: what the front door reads, checks and rewrites.

Only what IoT Hub's MQTT endpoint speaks: protocol level 4, QoS 0 and 1. A packet is kept as its
type, its four flag bits and its body (variable header + payload), so that packets the front door
does not need to understand (PUBACK, PINGREQ, ...) pass through untouched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PROTOCOL_LEVEL_311 = 4
SUBACK_FAILURE = 0x80
MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable-length integer


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1; the connection must be closed."""


class UnsupportedProtocol(ProtocolError):
    """A CONNECT for another protocol level (answered with CONNACK 1 before closing)."""


@dataclass(frozen=True)
class Packet:
    kind: int
    flags: int
    body: bytes

    def encode(self) -> bytes:
        return encode_packet(self.kind, self.flags, self.body)


@dataclass(frozen=True)
class Connect:
    client_id: str
    clean_session: bool
    keepalive_s: int
    username: str | None = None
    password: bytes | None = None
    has_will: bool = False


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


class PacketReader:
    """Splits a byte stream into packets; a packet larger than ``max_bytes`` is an error."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self._buffer += data
        packets: list[Packet] = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= 2:
            length, header = _remaining_length(buffer, start + 1)
            if header == 0:
                break
            if length > self.max_bytes:
                raise ProtocolError(f"packet of {length} bytes is over {self.max_bytes}")
            end = start + 1 + header + length
            if end > len(buffer):
                break
            first = buffer[start]
            packets.append(
                Packet(first >> 4, first & 0x0F, bytes(buffer[start + 1 + header : end]))
            )
            start = end
        if start:
            del buffer[:start]
        return packets


def _remaining_length(buffer: bytearray, offset: int) -> tuple[int, int]:
    """(length, bytes it took); (0, 0) while the variable-length integer is incomplete."""
    value, shift = 0, 0
    for index in range(4):
        if offset + index >= len(buffer):
            return 0, 0
        byte = buffer[offset + index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise ProtocolError("malformed remaining length")


def encode_packet(kind: int, flags: int, body: bytes) -> bytes:
    length = len(body)
    if length > MAX_REMAINING_LENGTH:
        raise ProtocolError("packet too large")
    header = bytearray([(kind << 4) | flags])
    while True:
        byte = length & 0x7F
        length >>= 7
        header.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes(header) + body


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _binary(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class _Cursor:
    """Reads MQTT fields from a body; any overrun is a ProtocolError."""

    def __init__(self, body: bytes, offset: int = 0) -> None:
        self.body = body
        self.offset = offset

    def take(self, count: int) -> bytes:
        end = self.offset + count
        if end > len(self.body):
            raise ProtocolError("packet ends early")
        data = self.body[self.offset : end]
        self.offset = end
        return data

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        data = self.binary()
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None
        if "\x00" in text:
            raise ProtocolError("string contains U+0000")
        return text

    @property
    def rest(self) -> bytes:
        return self.body[self.offset :]

    @property
    def done(self) -> bool:
        return self.offset >= len(self.body)


def parse_connect(body: bytes) -> Connect:
    cursor = _Cursor(body)
    name = cursor.string()
    level = cursor.u8()
    if name != "MQTT" or level != PROTOCOL_LEVEL_311:
        raise UnsupportedProtocol(f"protocol {name!r} level {level}")
    flags = cursor.u8()
    if flags & 0x01:
        raise ProtocolError("reserved CONNECT flag set")
    keepalive = cursor.u16()
    client_id = cursor.string()
    has_will = bool(flags & 0x04)
    if has_will:
        cursor.string()
        cursor.binary()
    username = cursor.string() if flags & 0x80 else None
    password = cursor.binary() if flags & 0x40 else None
    if password is not None and username is None:
        raise ProtocolError("password without user name")
    return Connect(client_id, bool(flags & 0x02), keepalive, username, password, has_will)


def encode_connect(connect: Connect) -> bytes:
    """A CONNECT without a will (the front door never forwards one)."""
    flags = 0x02 if connect.clean_session else 0
    payload = _string(connect.client_id)
    if connect.username is not None:
        flags |= 0x80
        payload += _string(connect.username)
    if connect.password is not None:
        flags |= 0x40
        payload += _binary(connect.password)
    header = _string("MQTT") + bytes([PROTOCOL_LEVEL_311, flags])
    return encode_packet(CONNECT, 0, header + struct.pack("!H", connect.keepalive_s) + payload)


def encode_connack(session_present: bool, code: int) -> bytes:
    return encode_packet(CONNACK, 0, bytes([1 if session_present else 0, code]))


def parse_connack(body: bytes) -> tuple[bool, int]:
    if len(body) != 2:
        raise ProtocolError("CONNACK must be 2 bytes")
    return bool(body[0] & 0x01), body[1]


def parse_publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("QoS 3")
    cursor = _Cursor(body)
    topic = cursor.string()
    packet_id = cursor.u16() if qos else None
    return Publish(topic, cursor.rest, qos, bool(flags & 0x01), bool(flags & 0x08), packet_id)


def encode_publish(publish: Publish) -> bytes:
    flags = (publish.qos << 1) | (0x01 if publish.retain else 0) | (0x08 if publish.dup else 0)
    body = _string(publish.topic)
    if publish.qos:
        if publish.packet_id is None:
            raise ProtocolError("QoS 1 PUBLISH needs a packet id")
        body += struct.pack("!H", publish.packet_id)
    return encode_packet(PUBLISH, flags, body + publish.payload)


def with_topic(flags: int, body: bytes, topic: str) -> bytes:
    """The same PUBLISH (flags, packet id, payload) under another topic name."""
    cursor = _Cursor(body)
    cursor.binary()
    return encode_packet(PUBLISH, flags, _string(topic) + cursor.rest)


def publish_topic(body: bytes) -> str:
    return _Cursor(body).string()


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    cursor = _Cursor(body)
    packet_id = cursor.u16()
    filters: list[tuple[str, int]] = []
    while not cursor.done:
        topic = cursor.string()
        options = cursor.u8()
        if options & 0xFC or options & 0x03 == 3:
            raise ProtocolError("bad subscription options")
        filters.append((topic, options))
    if not filters:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return packet_id, filters


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id)
    for topic, qos in filters:
        body += _string(topic) + bytes([qos])
    return encode_packet(SUBSCRIBE, 0x02, body)


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    cursor = _Cursor(body)
    return cursor.u16(), list(cursor.rest)


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    return encode_packet(SUBACK, 0, struct.pack("!H", packet_id) + bytes(codes))


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    cursor = _Cursor(body)
    packet_id = cursor.u16()
    topics: list[str] = []
    while not cursor.done:
        topics.append(cursor.string())
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return packet_id, topics


def encode_unsubscribe(packet_id: int, topics: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(t) for t in topics)
    return encode_packet(UNSUBSCRIBE, 0x02, body)


def encode_unsuback(packet_id: int) -> bytes:
    return encode_packet(UNSUBACK, 0, struct.pack("!H", packet_id))


def encode_puback(packet_id: int) -> bytes:
    return encode_packet(PUBACK, 0, struct.pack("!H", packet_id))


def packet_id_of(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolError("packet id missing")
    value: int = struct.unpack("!H", body[:2])[0]
    return value


PINGREQ_BYTES = encode_packet(PINGREQ, 0, b"")
PINGRESP_BYTES = encode_packet(PINGRESP, 0, b"")
DISCONNECT_BYTES = encode_packet(DISCONNECT, 0, b"")
