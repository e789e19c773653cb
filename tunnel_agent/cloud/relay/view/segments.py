"""What the remuxer hands the fan-out (an init segment per camera connection, then fragments), and
the errors of the remuxer and the snapshot decoder. No PyAV here: the relay loads it only when a
snapshot is first asked for."""

from __future__ import annotations

from dataclasses import dataclass

from tunnel_agent.cloud.relay.view.boxes import InitInfo


@dataclass(frozen=True, slots=True)
class InitSegment:
    """``ftyp`` + ``moov`` of one camera connection (``generation``); MSE needs it first."""

    data: bytes
    info: InitInfo
    generation: int
    video_codec: str  # FFmpeg's name: "h264", "hevc"


@dataclass(frozen=True, slots=True)
class Fragment:
    """One ``moof`` + ``mdat``: a few frames (and any audio next to them)."""

    data: bytes
    keyframe: bool
    generation: int
    captured_at: float  # monotonic time the newest packet in it was read from the camera


@dataclass(frozen=True, slots=True)
class Keyframe:
    """A video keyframe as coded, with what a decoder needs to turn it into a still image."""

    codec: str
    extradata: bytes | None
    data: bytes
    generation: int
    sequence: int


class CameraStreamError(Exception):
    """The camera's stream cannot be shown (nothing playable in it); the reason is for users."""


class SnapshotFailed(Exception):
    """The keyframe could not be decoded; the reason names no secret."""
