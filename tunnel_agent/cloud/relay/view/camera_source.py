"""The view's own fields of ``POST /v1/sessions``: where the stream is on the camera, and how to log
in to it.

The relay knows a session's device and camera port; the RTSP path (``rtspPath``, default ``/``)
and the camera's credentials (``rtspUsername``, ``rtspPassword``) only the creator can tell. They
are kept in memory for the session's life, never written anywhere, and the password is registered
as a secret so that no log line can carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunnel_agent.cloud.relay.sessions import InvalidSessionRequest

MAX_PATH_CHARS = 1024
MAX_CREDENTIAL_CHARS = 256


@dataclass(frozen=True)
class CameraSource:
    path: str = "/"
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_camera_source(body: dict[str, Any]) -> CameraSource:
    """The view's fields of a session request, checked; absent fields take their defaults."""
    path = body.get("rtspPath", "/")
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > MAX_PATH_CHARS
        or any(c.isspace() or ord(c) < 32 or c in "#\x7f" for c in path)
    ):
        raise InvalidSessionRequest(
            f"rtspPath must be a path starting with / of at most {MAX_PATH_CHARS} characters,"
            " without spaces, control characters or #"
        )
    username = _credential(body, "rtspUsername")
    password = _credential(body, "rtspPassword")
    if password is not None and username is None:
        raise InvalidSessionRequest("rtspPassword needs rtspUsername")
    return CameraSource(path, username, password)


def _credential(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CREDENTIAL_CHARS:
        raise InvalidSessionRequest(
            f"{name} must be a non-empty string of at most {MAX_CREDENTIAL_CHARS} characters"
        )
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise InvalidSessionRequest(f"{name} must not contain control characters")
    return value
