"""RTSP authentication (RFC 2617 / RFC 7616, as RTSP cameras use it): answer the camera's challenge
with Basic or Digest credentials. Pure code; the client sends credentials only after a 401, in
the scheme the camera asked for (Digest when it offers both), so a Digest camera never sees the
password in clear."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field

from tunnel_agent.rtsp.errors import RtspAuthFailed

_PARAMETER = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "digest"
    parameters: dict[str, str] = field(default_factory=dict)


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Every ``WWW-Authenticate`` challenge (one per header; parameters unquoted)."""
    challenges: list[Challenge] = []
    for header in headers:
        scheme, _, rest = header.strip().partition(" ")
        parameters = {m.group(1).lower(): _unquote(m.group(2)) for m in _PARAMETER.finditer(rest)}
        challenges.append(Challenge(scheme.lower(), parameters))
    return challenges


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


class Credentials:
    """A user's name and password, and the chosen challenge once the camera has sent one."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        self._challenge: Challenge | None = None
        self._count = 0

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, ...)"

    def accept(self, headers: list[str]) -> None:
        """Take the camera's challenge: Digest (MD5 or SHA-256) if offered, else Basic."""
        challenges = parse_challenges(headers)
        digest = [
            c
            for c in challenges
            if c.scheme == "digest"
            and c.parameters.get("algorithm", "MD5").upper() in _HASHES
            and "nonce" in c.parameters
        ]
        basic = [c for c in challenges if c.scheme == "basic"]
        if not digest and not basic:
            raise RtspAuthFailed("the camera asks for an authentication scheme this relay lacks")
        self._challenge = (digest or basic)[0]
        self._count = 0

    @property
    def ready(self) -> bool:
        return self._challenge is not None

    def authorization(self, method: str, uri: str) -> str:
        """The ``Authorization`` header for one request."""
        challenge = self._challenge
        assert challenge is not None
        if challenge.scheme == "basic":
            token = f"{self.username}:{self._password}".encode()
            return "Basic " + base64.b64encode(token).decode("ascii")
        self._count += 1
        return digest_authorization(
            challenge.parameters,
            username=self.username,
            password=self._password,
            method=method,
            uri=uri,
            count=self._count,
            cnonce=os.urandom(8).hex(),
        )


def digest_authorization(
    challenge: dict[str, str],
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    count: int,
    cnonce: str,
) -> str:
    """A Digest ``Authorization`` value; with ``qop=auth`` when the challenge offers it."""
    algorithm = challenge.get("algorithm", "MD5").upper()
    hash_function = _HASHES[algorithm]

    def digest(text: str) -> str:
        return hash_function(text.encode()).hexdigest()

    realm, nonce = challenge.get("realm", ""), challenge["nonce"]
    first = digest(f"{username}:{realm}:{password}")
    second = digest(f"{method}:{uri}")
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    fields = [
        f'username="{_quote(username)}"',
        f'realm="{_quote(realm)}"',
        f'nonce="{_quote(nonce)}"',
        f'uri="{_quote(uri)}"',
    ]
    if "auth" in qops:
        nc = f"{count:08x}"
        response = digest(f"{first}:{nonce}:{nc}:{cnonce}:auth:{second}")
        fields += [f'response="{response}"', "qop=auth", f"nc={nc}", f'cnonce="{cnonce}"']
    else:
        fields.append(f'response="{digest(f"{first}:{nonce}:{second}")}"')
    if "algorithm" in challenge:
        fields.append(f"algorithm={challenge['algorithm']}")
    if "opaque" in challenge:
        fields.append(f'opaque="{_quote(challenge["opaque"])}"')
    return "Digest " + ", ".join(fields)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
