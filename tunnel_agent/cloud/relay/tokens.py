"""Single-use tunnel tokens: minted per consumer connection, kept only as hashes.

A token proves that the WebSocket arriving at ``/v1/tunnels/<id>`` is the device the relay asked
(through the hub) to connect. It has 256 random bits, lives ``ttl_s`` seconds, works once, and the
relay keeps only its SHA-256, compared in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

TOKEN_BYTES = 32


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    UNKNOWN = "unknown tunnel"
    WRONG = "wrong token"
    EXPIRED = "expired token"
    USED = "token already used"


@dataclass
class _Entry:
    digest: bytes
    expires_at: float
    used: bool = False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}

    def mint(self, now: float) -> tuple[str, str]:
        """A new (tunnel id, token); the token itself is not kept."""
        tunnel_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._entries[tunnel_id] = _Entry(_digest(token), now + self.ttl_s)
        return tunnel_id, token

    def redeem(self, tunnel_id: str, presented: str | None, now: float) -> Verdict:
        entry = self._entries.get(tunnel_id)
        if entry is None:
            return Verdict.UNKNOWN
        if presented is None or not hmac.compare_digest(entry.digest, _digest(presented)):
            return Verdict.WRONG
        if entry.used:
            return Verdict.USED
        if now > entry.expires_at:
            return Verdict.EXPIRED
        entry.used = True
        return Verdict.ACCEPTED

    def forget(self, tunnel_id: str) -> None:
        self._entries.pop(tunnel_id, None)

    def purge(self, now: float) -> None:
        """Drop entries that can no longer be redeemed (called now and then)."""
        for tunnel_id in [t for t, e in self._entries.items() if e.used or now > e.expires_at + 60]:
            del self._entries[tunnel_id]

    def __len__(self) -> int:
        return len(self._entries)
