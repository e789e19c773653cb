"""Media streams changed from the cloud: the ``mediaStreams`` writable twin property.

The desired value lists cameras and the streams each should run (same fields and aliases as the
TOML file). It is validated as a whole before anything changes; a camera listed gets exactly the
streams given, cameras not listed keep theirs. The answer follows the IoT Plug and Play convention
for writable properties: ``{"value", "ac", "av", "ad"}``, with every secret in the value masked.

Whoever can write the twin is not the device's administrator, so the twin is confined: its folders
are relative to ``[media] output_root`` and stay inside it; it may send video only to
``allowed_media_servers`` (plain RTSP only with ``allow_plain_restream_from_twin``), never name a
certificate file on the device, ask for more than ``max_streams`` streams in all, lower the
low-disk guard below 64 MiB or take more than ``max_snapshots_per_second``. A stream identical to
one the device's file gives that camera is accepted as it is: it grants nothing new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from tunnel_agent.config.settings import CameraSettings
from tunnel_agent.logs import MASK
from tunnel_agent.media.files import PathRefused, confined_folder
from tunnel_agent.media.settings import (
    FS_TASKS,
    SNAPSHOT_TASKS,
    STREAM_TASKS,
    TWIN_MIN_FREE_BYTES,
    MediaSettings,
    StreamSettings,
)

PROPERTY = "mediaStreams"
ACCEPTED, REFUSED, FAILED = 200, 400, 500
CERTIFICATE_KEYS = ("mediaServerCertificate", "media_server_ca_file")


class DesiredError(ValueError):
    """Why a desired value was refused; names the camera, stream and field."""


def parse_desired_streams(
    value: Any,
    cameras: Mapping[str, CameraSettings],
    mqtt_configured: bool,
    media: MediaSettings,
    configured: Mapping[str, Sequence[StreamSettings]],
) -> dict[str, list[StreamSettings]]:
    """Camera name -> its new streams, or DesiredError. Touches nothing, creates nothing.

    ``cameras`` are the cameras as they run now, ``configured`` their streams from the file.
    """
    if not isinstance(value, list):
        raise DesiredError(f"{PROPERTY} must be a list of {{camera, streams}} objects")
    entries: dict[str, tuple[str, list[Any]]] = {}
    for index, entry in enumerate(value):
        where = f"{PROPERTY}[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"camera", "streams"}:
            raise DesiredError(f"{where}: expected an object with camera and streams")
        name = entry.get("camera")
        if not isinstance(name, str) or name not in cameras:
            raise DesiredError(f"{where}.camera: no configured camera {str(name)[:64]!r}")
        if name in entries:
            raise DesiredError(f"{where}.camera: camera {name!r} is listed twice")
        if not cameras[name].url:
            raise DesiredError(f"{where}: camera {name!r} has no url to take media from")
        streams = entry.get("streams", [])
        if not isinstance(streams, list):
            raise DesiredError(f"{where}.streams must be a list")
        entries[name] = (where, streams)
    total = sum(len(streams) for _, streams in entries.values()) + sum(
        len(camera.streams) for name, camera in cameras.items() if name not in entries
    )
    if total > media.max_streams:
        raise DesiredError(
            f"{PROPERTY}: {total} streams on all cameras, more than this device runs"
            f" ([media] max_streams = {media.max_streams})"
        )
    result: dict[str, list[StreamSettings]] = {}
    for name, (where, streams) in entries.items():
        parsed = [
            _stream(
                stream, f"{where}.streams[{i}]", mqtt_configured, media, configured.get(name, ())
            )
            for i, stream in enumerate(streams)
        ]
        names = [s.name for s in parsed]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise DesiredError(
                f"{where}.streams: stream name {sorted(duplicates)[0]!r} is used twice"
            )
        result[name] = parsed
    return result


def _stream(
    stream: Any,
    label: str,
    mqtt_configured: bool,
    media: MediaSettings,
    from_file: Sequence[StreamSettings],
) -> StreamSettings:
    if isinstance(stream, dict) and isinstance(stream.get("name"), str):
        label += f" ({stream['name'][:64]!r})"
    if isinstance(stream, dict):
        for key in CERTIFICATE_KEYS:
            if key in stream:  # refused before it is read: checking it would reveal the file
                raise DesiredError(
                    f"{label}.{key}: a file on the device cannot be named from the twin;"
                    " configure the certificate in the device's file"
                )
    try:
        settings = StreamSettings.model_validate(stream)
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        reason = str(first["msg"]).removeprefix("Value error, ")
        raise DesiredError(f"{label}{'.' + field if field else ''}: {reason}") from None
    if settings.task == "snapshot-to-mqtt" and not mqtt_configured:
        raise DesiredError(f"{label}: snapshot-to-mqtt needs an [mqtt] section on the device")
    if settings in from_file:
        return settings
    return _confined(settings, stream, label, media)


def _confined(
    settings: StreamSettings, raw: dict[str, Any], label: str, media: MediaSettings
) -> StreamSettings:
    """The twin's limits; the stream with its folder resolved inside ``output_root``."""

    def refuse(field: str, *aliases: str, reason: str) -> DesiredError:
        spelled = next((key for key in (field, *aliases) if key in raw), field)
        return DesiredError(f"{label}.{spelled}: {reason}")

    task = settings.task
    if task in FS_TASKS:
        assert settings.path is not None
        try:
            folder = confined_folder(settings.path, media.output_root)
        except PathRefused as exc:
            raise refuse("path", reason=str(exc)) from None
        if settings.min_free_bytes < TWIN_MIN_FREE_BYTES:
            raise refuse(
                "min_free_bytes",
                reason=f"must be at least {TWIN_MIN_FREE_BYTES} ({TWIN_MIN_FREE_BYTES >> 20} MiB)"
                " when set from the twin",
            )
        settings = settings.model_copy(update={"path": folder})
    if task in SNAPSHOT_TASKS:
        rate, most = settings.snapshots_per_second, media.max_snapshots_per_second
        if rate == 0 or rate > most:
            raise refuse(
                "snapshots_per_second",
                "snapshotsPerSecond",
                reason=f"must be more than 0 and at most {most:g} ([media]"
                " max_snapshots_per_second) when set from the twin",
            )
    if task in STREAM_TASKS:
        host = settings.media_server_address or ""
        if not media.media_server_allowed(host):
            raise refuse(
                "media_server_address",
                "mediaServerAddress",
                reason=f"{host!r} is not in [media] allowed_media_servers",
            )
        if task == "stream-to-rtsp" and not media.allow_plain_restream_from_twin:
            raise refuse(
                "task",
                "taskType",
                reason="stream-to-rtsp (unencrypted) from the twin needs [media]"
                " allow_plain_restream_from_twin = true; use stream-to-rtsps",
            )
    return settings


def masked(value: Any) -> Any:
    """``value`` with every password replaced, for the acknowledgement (it is reported)."""
    if isinstance(value, dict):
        return {
            key: MASK if isinstance(key, str) and "password" in key.lower() else masked(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [masked(item) for item in value]
    return value


def acknowledgement(value: Any, code: int, version: int, description: str) -> dict[str, Any]:
    return {PROPERTY: {"value": masked(value), "ac": code, "av": version, "ad": description}}
