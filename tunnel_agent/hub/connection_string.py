"""IoT Hub connection strings (``Key=value;Key=value``), parsed without ever echoing a key."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping

DEVICE_REQUIRED = ("HostName", "DeviceId", "SharedAccessKey")
SERVICE_REQUIRED = ("HostName", "SharedAccessKeyName", "SharedAccessKey")


class InvalidConnectionString(ValueError):
    """The reason a connection string is unusable; never contains the string itself."""


def parse_connection_string(text: str, required: Iterable[str]) -> Mapping[str, str]:
    fields: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InvalidConnectionString("expected Key=value pairs separated by ';'")
        if key in fields:
            raise InvalidConnectionString(f"{key} is given twice")
        fields[key] = value
    missing = [key for key in required if not fields.get(key)]
    if missing:
        raise InvalidConnectionString(f"missing {', '.join(missing)}")
    if "SharedAccessKey" in fields:
        check_base64_key(fields["SharedAccessKey"], "SharedAccessKey")
    return fields


def check_base64_key(value: str, name: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidConnectionString(f"{name} is not valid base64") from None
    if not key:
        raise InvalidConnectionString(f"{name} is empty")
    return key
