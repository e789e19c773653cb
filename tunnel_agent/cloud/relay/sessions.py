"""Sessions: a consumer's right to reach one camera port of one device, for a while, from somewhere.

``POST /v1/sessions`` (API key) makes one: a consumer token (256 random bits, kept only as its
SHA-256), a lifetime (``ttl``, default one hour, at most a day) and the sources it may be used
from (``allowedSources``; by default the API caller's own address). The token admits any number
of consumer connections until the session expires or is revoked. This module holds the rules and
the book of sessions; listeners and tunnels live in core.py.

An ended session leaves a tombstone for a while, so that a consumer presenting its token is told
"session expired" or "session revoked" rather than a bare "no such session".
"""

from __future__ import annotations

import enum
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from tunnel_agent.cloud.relay.sources import (
    InvalidSources,
    Network,
    is_allowed,
    parse_networks,
    single_source,
)
from tunnel_agent.cloud.relay.tokens import new_token, token_matches

DEFAULT_TTL_S = 3600
MAX_TTL_S = 86_400
TOMBSTONE_S = 3600.0
MAX_TOMBSTONES = 10_000
MAX_DEVICE_ID_CHARS = 128
MAX_ALLOWED_SOURCES = 64
Protocol = Literal["rtsp", "tcp"]
PROTOCOLS: tuple[Protocol, ...] = ("rtsp", "tcp")


class Verdict(enum.Enum):
    """What a presented session token is worth, with the HTTP status a refusal carries."""

    ACCEPTED = ("accepted", 200)
    UNKNOWN = ("no such session", 404)
    WRONG_TOKEN = ("wrong token", 401)
    EXPIRED = ("session expired", 401)
    REVOKED = ("session revoked", 401)
    SOURCE = ("source not allowed", 403)

    @property
    def reason(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


class InvalidSessionRequest(ValueError):
    """The body of ``POST /v1/sessions`` is unusable; the message says which field and why."""


class SessionLimit(Exception):
    """``max_sessions`` are open."""


@dataclass(frozen=True)
class SessionRequest:
    device_id: str
    local_port: int
    ttl_s: int
    allowed_sources: tuple[Network, ...] | None
    protocol: Protocol


def parse_session_request(body: object) -> SessionRequest:
    """Check every field of the JSON body; unknown fields are ignored, as IoT Hub does."""
    if not isinstance(body, dict):
        raise InvalidSessionRequest("body must be a JSON object")
    device_id, local_port = body.get("deviceId"), body.get("localPort")
    if not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID_CHARS:
        raise InvalidSessionRequest("deviceId must be a non-empty string of at most 128 characters")
    if (
        isinstance(local_port, bool)
        or not isinstance(local_port, int)
        or not 0 < local_port < 65536
    ):
        raise InvalidSessionRequest("localPort must be an integer between 1 and 65535")
    ttl = body.get("ttl", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_S:
        raise InvalidSessionRequest(f"ttl must be an integer number of seconds, 1 to {MAX_TTL_S}")
    protocol = body.get("protocol", "rtsp")
    if protocol not in PROTOCOLS:
        raise InvalidSessionRequest('protocol must be "rtsp" or "tcp"')
    sources = body.get("allowedSources")
    networks: tuple[Network, ...] | None = None
    if sources is not None:
        if not isinstance(sources, list) or not 0 < len(sources) <= MAX_ALLOWED_SOURCES:
            raise InvalidSessionRequest(
                f"allowedSources must be a list of 1 to {MAX_ALLOWED_SOURCES} CIDRs"
            )
        try:
            networks = parse_networks(sources)
        except InvalidSources as exc:
            raise InvalidSessionRequest(f"allowedSources: {exc}") from None
    return SessionRequest(device_id, local_port, ttl, networks, protocol)


@dataclass(eq=False)
class Session:
    """One session. ``allowed_sources`` always applies to its TCP address; to its consumer
    WebSockets only when the creator gave it (``sources_given``)."""

    id: str
    device_id: str
    local_port: int
    protocol: Protocol
    token_digest: bytes = field(repr=False)
    created_at: float  # Unix time
    expires_at: float  # Unix time
    expires_at_mono: float
    allowed_sources: tuple[Network, ...]
    sources_given: bool
    host: str = ""  # the TCP address consumers are given
    port: int = 0
    kind: str = "session"

    @property
    def expires_at_iso(self) -> str:
        moment = datetime.fromtimestamp(self.expires_at, tz=UTC).replace(microsecond=0)
        return moment.isoformat().replace("+00:00", "Z")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def describe(self) -> dict[str, Any]:
        """The fields every session answer carries (api.py adds the URLs and, once, the token)."""
        return {
            "id": self.id,
            "deviceId": self.device_id,
            "localPort": self.local_port,
            "protocol": self.protocol,
            "address": self.address,
            "expiresAt": self.expires_at_iso,
            "allowedSources": [str(n) for n in self.allowed_sources],
        }


class SessionBook:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        self._tombstones: OrderedDict[str, tuple[Verdict, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.sessions)

    def create(
        self, request: SessionRequest, caller: str, now: float, now_mono: float
    ) -> tuple[Session, str]:
        """A new session (not yet listening) and its token, which is not kept."""
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimit(f"at most {self.max_sessions} sessions")
        token, digest = new_token()
        sources = request.allowed_sources
        session = Session(
            id=secrets.token_hex(8),
            device_id=request.device_id,
            local_port=request.local_port,
            protocol=request.protocol,
            token_digest=digest,
            created_at=now,
            expires_at=now + request.ttl_s,
            expires_at_mono=now_mono + request.ttl_s,
            allowed_sources=sources if sources is not None else single_source(caller),
            sources_given=sources is not None,
        )
        self.sessions[session.id] = session
        return session, token

    def check(
        self, session_id: str, token: str | None, source: str, now_mono: float
    ) -> tuple[Verdict, Session | None]:
        """May ``token`` be used for ``session_id`` from ``source``, right now?"""
        session = self.sessions.get(session_id)
        if session is None:
            ended = self._tombstones.get(session_id)
            return (ended[0] if ended is not None else Verdict.UNKNOWN), None
        if not token_matches(session.token_digest, token):
            return Verdict.WRONG_TOKEN, session
        if now_mono >= session.expires_at_mono:
            return Verdict.EXPIRED, session
        if session.sources_given and not is_allowed(source, session.allowed_sources):
            return Verdict.SOURCE, session
        return Verdict.ACCEPTED, session

    def end(self, session_id: str, why: Verdict, now_mono: float) -> Session | None:
        """Remove a session (``why`` is EXPIRED or REVOKED), leaving a tombstone."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self._tombstones[session_id] = (why, now_mono)
            self._tombstones.move_to_end(session_id)
            self._forget_tombstones(now_mono)
        return session

    def _forget_tombstones(self, now_mono: float) -> None:
        while self._tombstones:
            oldest_id, (_, ended_at) = next(iter(self._tombstones.items()))
            if len(self._tombstones) <= MAX_TOMBSTONES and now_mono - ended_at < TOMBSTONE_S:
                break
            del self._tombstones[oldest_id]
