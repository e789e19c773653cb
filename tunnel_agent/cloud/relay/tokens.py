"""Bearer tokens, kept only as hashes and compared in constant time.

Two kinds: a *tunnel token* proves that the WebSocket arriving at ``/v1/tunnels/<id>`` is the
device the relay asked (through the hub) to connect: minted per tunnel, it lives ``ttl_s``
seconds and works once. A *consumer token* belongs to a session and admits any number of
consumer connections until the session ends (see sessions.py). Both have 256 random bits.
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


def new_token() -> tuple[str, bytes]:
    """A fresh token (URL-safe, 43 characters for 256 bits) and the digest to keep of it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, _digest(token)


def token_matches(digest: bytes, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(digest, _digest(presented))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class TokenBook:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}

    def mint(self, now: float) -> tuple[str, str]:
        """A new (tunnel id, token); the token itself is not kept."""
        tunnel_id = secrets.token_hex(8)
        token, digest = new_token()
        self._entries[tunnel_id] = _Entry(digest, now + self.ttl_s)
        return tunnel_id, token

    def redeem(self, tunnel_id: str, presented: str | None, now: float) -> Verdict:
        entry = self._entries.get(tunnel_id)
        if entry is None:
            return Verdict.UNKNOWN
        if not token_matches(entry.digest, presented):
            return Verdict.WRONG
        if entry.used:
            return Verdict.USED
        if now > entry.expires_at:
            return Verdict.EXPIRED
        entry.used = True
        return Verdict.ACCEPTED

    def purge(self, now: float) -> None:
        """Drop entries that can no longer be redeemed (called now and then)."""
        for tunnel_id in [t for t, e in self._entries.items() if e.used or now > e.expires_at + 60]:
            del self._entries[tunnel_id]

    def __len__(self) -> int:
        return len(self._entries)
