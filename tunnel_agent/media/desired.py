"""Media streams changed from the cloud: the ``mediaStreams`` writable twin property.

The desired value lists cameras and the streams each should run (same fields and aliases as the
TOML file). It is validated as a whole before anything changes; a camera listed gets exactly the
streams given, cameras not listed keep theirs. The answer follows the IoT Plug and Play convention
for writable properties: ``{"value", "ac", "av", "ad"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from tunnel_agent.config.settings import CameraSettings
from tunnel_agent.media.settings import StreamSettings

PROPERTY = "mediaStreams"
ACCEPTED, REFUSED, FAILED = 200, 400, 500


class DesiredError(ValueError):
    """Why a desired value was refused; names the camera, stream and field."""


def parse_desired_streams(
    value: Any, cameras: Mapping[str, CameraSettings], mqtt_configured: bool
) -> dict[str, list[StreamSettings]]:
    """Camera name -> its new streams, or DesiredError. Touches nothing."""
    if not isinstance(value, list):
        raise DesiredError(f"{PROPERTY} must be a list of {{camera, streams}} objects")
    result: dict[str, list[StreamSettings]] = {}
    for index, entry in enumerate(value):
        where = f"{PROPERTY}[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"camera", "streams"}:
            raise DesiredError(f"{where}: expected an object with camera and streams")
        name = entry.get("camera")
        if not isinstance(name, str) or name not in cameras:
            raise DesiredError(f"{where}.camera: no configured camera {str(name)[:64]!r}")
        if name in result:
            raise DesiredError(f"{where}.camera: camera {name!r} is listed twice")
        if not cameras[name].url:
            raise DesiredError(f"{where}: camera {name!r} has no url to take media from")
        streams = entry.get("streams", [])
        if not isinstance(streams, list):
            raise DesiredError(f"{where}.streams must be a list")
        parsed = []
        for stream_index, stream in enumerate(streams):
            label = f"{where}.streams[{stream_index}]"
            if isinstance(stream, dict) and isinstance(stream.get("name"), str):
                label += f" ({stream['name']!r})"
            try:
                settings = StreamSettings.model_validate(stream)
            except ValidationError as exc:
                first = exc.errors(include_input=False)[0]
                field = ".".join(str(p) for p in first["loc"])
                reason = str(first["msg"]).removeprefix("Value error, ")
                raise DesiredError(f"{label}{'.' + field if field else ''}: {reason}") from None
            if settings.task == "snapshot-to-mqtt" and not mqtt_configured:
                raise DesiredError(
                    f"{label}: snapshot-to-mqtt needs an [mqtt] section on the device"
                )
            parsed.append(settings)
        names = [s.name for s in parsed]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise DesiredError(
                f"{where}.streams: stream name {sorted(duplicates)[0]!r} is used twice"
            )
        result[name] = parsed
    return result


def acknowledgement(value: Any, code: int, version: int, description: str) -> dict[str, Any]:
    return {PROPERTY: {"value": value, "ac": code, "av": version, "ad": description}}
