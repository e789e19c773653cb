"""The RTSP client's errors: each message is for users and never holds a password or a URL with
credentials in it."""

from __future__ import annotations


class RtspError(Exception):
    """The camera could not be read; ``str(error)`` says why in words a user can act on."""


class RtspTimeout(RtspError):
    """The camera did not answer (or sent nothing) within the deadline."""


class RtspAuthFailed(RtspError):
    """The camera asked for credentials and refused the ones given (or none were given)."""


class RtspNotFound(RtspError):
    """The camera has no stream at the path asked for."""


class RtspConnectionLost(RtspError):
    """The connection to the camera closed or failed."""


class RtspProtocolError(RtspError):
    """The camera sent something this client cannot understand or use."""
