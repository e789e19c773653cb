"""IoT Hub shared access signatures: made by the relay, checked by the emulator.

``SharedAccessSignature sr=<resource>&sig=<HMAC-SHA256(key, resource + "\\n" + expiry)>&se=<expiry>
&skn=<policy>``, the resource URL-encoded in lower case, as IoT Hub documents it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

PREFIX = "SharedAccessSignature "


class InvalidSignature(Exception):
    """Why a SAS was refused (the message never contains the signature)."""


@dataclass(frozen=True)
class SasToken:
    resource: str
    expiry: int
    policy: str | None
    signature: str


def _sign(resource: str, expiry: int, key: bytes) -> str:
    message = f"{quote(resource.lower(), safe='')}\n{expiry}".encode()
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


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
    fields = {k: v[-1] for k, v in parse_qs(header[len(PREFIX) :], keep_blank_values=True).items()}
    try:
        return SasToken(fields["sr"], int(fields["se"]), fields.get("skn"), fields["sig"])
    except (KeyError, ValueError):
        raise InvalidSignature("sr, sig and se are required") from None


def verify_sas(header: str, resource: str, keys: dict[str, bytes], now: float) -> str:
    """Check a SAS for ``resource`` against named keys; return the policy name or raise."""
    token = parse_sas(header)
    if token.policy is None or token.policy not in keys:
        raise InvalidSignature("unknown key name")
    if token.resource.lower() != resource.lower():
        raise InvalidSignature("signature is for another resource")
    if token.expiry < now:
        raise InvalidSignature("signature expired")
    expected = _sign(resource, token.expiry, keys[token.policy])
    if not hmac.compare_digest(expected.encode(), token.signature.encode()):
        raise InvalidSignature("signature does not match")
    return token.policy
