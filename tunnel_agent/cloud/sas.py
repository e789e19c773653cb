"""IoT Hub shared access signatures: made by the relay, checked by the emulator.

``SharedAccessSignature sr=<resource>&sig=<HMAC-SHA256(key, resource + "\\n" + expiry)>&se=<expiry>
&skn=<policy>``, the resource URL-encoded in lower case, as IoT Hub documents it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote, unquote, unquote_plus

PREFIX = "SharedAccessSignature "


class InvalidSignature(Exception):
    """Why a SAS was refused (the message never contains the signature)."""


@dataclass(frozen=True)
class SasToken:
    resource: str
    expiry: int
    policy: str | None
    signature: str
    signed_resource: str  # ``sr`` exactly as sent: what the signature covers


def _hmac(message: str, key: bytes) -> str:
    return base64.b64encode(hmac.new(key, message.encode(), hashlib.sha256).digest()).decode()


def _sign(resource: str, expiry: int, key: bytes) -> str:
    return _hmac(f"{quote(resource.lower(), safe='')}\n{expiry}", key)


def generate_sas(resource: str, key_b64: str, policy: str | None, expiry: int) -> str:
    signature = _sign(resource, expiry, base64.b64decode(key_b64))
    token = (
        f"{PREFIX}sr={quote(resource.lower(), safe='')}&sig={quote(signature, safe='')}&se={expiry}"
    )
    if policy:
        token += f"&skn={quote(policy, safe='')}"
    return token


def parse_sas(header: str) -> SasToken:
    if not header.startswith(PREFIX):
        raise InvalidSignature("not a SharedAccessSignature")
    raw: dict[str, str] = {}
    for part in header[len(PREFIX) :].split("&"):
        name, _, value = part.partition("=")
        raw[name] = value
    try:
        return SasToken(
            unquote_plus(raw["sr"]),
            int(raw["se"]),
            unquote_plus(raw["skn"]) if "skn" in raw else None,
            unquote(raw["sig"]),
            raw["sr"],
        )
    except (KeyError, ValueError):
        raise InvalidSignature("sr, sig and se are required") from None


def verify_sas(header: str, resource: str | set[str], keys: dict[str, bytes], now: float) -> str:
    """Check a SAS for ``resource`` (or any of a set) against named keys; the policy name."""
    token = parse_sas(header)
    if token.policy is None or token.policy not in keys:
        raise InvalidSignature("unknown key name")
    resources = {resource} if isinstance(resource, str) else resource
    check_sas(token, resources, [keys[token.policy]], now)
    return token.policy


def check_sas(token: SasToken, resources: set[str], keys: list[bytes], now: float) -> None:
    """Resource (one of ``resources``, any case), expiry, then the signature with any key.

    The signature covers ``sr`` as the client encoded it: IoT Hub's SDKs URL-encode the resource
    without changing its case, so re-encoding it here could not reproduce theirs.
    """
    if token.resource.lower() not in {r.lower() for r in resources}:
        raise InvalidSignature("signature is for another resource")
    if token.expiry < now:
        raise InvalidSignature("signature expired")
    message = f"{token.signed_resource}\n{token.expiry}"
    for key in keys:
        if hmac.compare_digest(_hmac(message, key).encode(), token.signature.encode()):
            return
    raise InvalidSignature("signature does not match")
