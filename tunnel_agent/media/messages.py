"""A message for the MQTT publisher, apart from it: tasks build these without loading aiomqtt."""

from __future__ import annotations

from dataclasses import dataclass

# Fixed header + topic length field + properties headroom: added to the topic and payload sizes.
PACKET_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class OutgoingMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int | None
    content_type: str
    user_properties: tuple[tuple[str, str], ...]

    def size_bytes(self) -> int:
        extra = sum(len(k) + len(v) + 4 for k, v in self.user_properties) + len(self.content_type)
        return len(self.payload) + len(self.topic.encode()) + extra + PACKET_OVERHEAD_BYTES
