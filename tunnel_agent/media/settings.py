"""Media connector configuration: the MQTT broker, media tunables, and each camera's streams.

Stream settings follow the Azure IoT Operations media connector's task model; its camelCase
spellings (``taskType``, ``snapshotsPerSecond``, ``mediaServerAddress``, ...) and its enum values
(``Qos1``, ``retain = "Never"``) are accepted so its stream configurations can be pasted in.
"""

from __future__ import annotations

import fnmatch
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    field_validator,
    model_validator,
)

from tunnel_agent.config.base import Port, Section
from tunnel_agent.config.urls import InvalidUrl, check_host, parse_url

TaskType = Literal[
    "snapshot-to-mqtt", "snapshot-to-fs", "clip-to-fs", "stream-to-rtsp", "stream-to-rtsps"
]
SNAPSHOT_TASKS = ("snapshot-to-mqtt", "snapshot-to-fs")
FS_TASKS = ("snapshot-to-fs", "clip-to-fs")
STREAM_TASKS = ("stream-to-rtsp", "stream-to-rtsps")

# Image formats (jpg/tif are spellings of jpeg/tiff).
IMAGE_FORMATS = {
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "png": "png",
    "bmp": "bmp",
    "tif": "tiff",
    "tiff": "tiff",
}
# Clip formats -> (FFmpeg muxer, file extension). Streams are copied, never re-encoded.
CLIP_FORMATS = {
    "mkv": ("matroska", "mkv"),
    "mp4": ("mp4", "mp4"),
    "mov": ("mov", "mov"),
    "avi": ("avi", "avi"),
    "mts": ("mpegts", "mts"),
    "ts": ("mpegts", "ts"),
    "mpg": ("mpeg", "mpg"),
    "mpeg": ("mpeg", "mpeg"),
    "flv": ("flv", "flv"),
    "webm": ("webm", "webm"),
    "mjpeg": ("mjpeg", "mjpeg"),
}
DEFAULT_TOPIC = "azure-iot-operations/data/{camera}/{stream}"
MQTT_SCHEMES = ("mqtt", "mqtts")
TWIN_MIN_FREE_BYTES = 64 * 1024 * 1024  # the low-disk guard the twin cannot go below


class StreamSettings(Section):
    """One task on a camera's media: a snapshot, clip or re-streaming job."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
    task: TaskType = Field(validation_alias=AliasChoices("task", "taskType"))
    format: str | None = Field(default=None, validation_alias=AliasChoices("format", "taskFormat"))
    snapshots_per_second: float = Field(
        default=1.0,
        ge=0,
        le=60,
        validation_alias=AliasChoices("snapshots_per_second", "snapshotsPerSecond"),
    )
    topic: str | None = None
    qos: Literal[0, 1] = 1
    retain: bool = False
    ttl: Annotated[int, Field(ge=0, le=4_294_967_295)] | None = 60
    path: Path | None = None
    duration: float = Field(default=60.0, gt=0, le=86_400)
    media_server_address: str | None = Field(
        default=None, validation_alias=AliasChoices("media_server_address", "mediaServerAddress")
    )
    media_server_port: Port = Field(
        default=8554, validation_alias=AliasChoices("media_server_port", "mediaServerPort")
    )
    media_server_path: str = Field(
        default="", validation_alias=AliasChoices("media_server_path", "mediaServerPath")
    )
    media_server_username: str | None = Field(
        default=None, validation_alias=AliasChoices("media_server_username", "mediaServerUsername")
    )
    media_server_password: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("media_server_password", "mediaServerPassword")
    )
    media_server_ca_file: FilePath | None = Field(
        default=None,
        validation_alias=AliasChoices("media_server_ca_file", "mediaServerCertificate"),
    )
    autostart: bool = True
    # Retention for *-to-fs (0 = no limit) and the low-disk guard.
    max_age: Annotated[float, Field(ge=0)] = 0
    max_files: Annotated[int, Field(ge=0)] = 0
    max_bytes: Annotated[int, Field(ge=0)] = 0
    min_free_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024

    @field_validator("qos", mode="before")
    @classmethod
    def _qos_spelling(cls, value: Any) -> Any:
        return {"qos0": 0, "qos1": 1}.get(value.lower(), value) if isinstance(value, str) else value

    @field_validator("retain", mode="before")
    @classmethod
    def _retain_spelling(cls, value: Any) -> Any:
        return (
            {"never": False, "keep": True}.get(value.lower(), value)
            if isinstance(value, str)
            else value
        )

    @field_validator("media_server_address")
    @classmethod
    def _check_media_server(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_host(value)
        except InvalidUrl as exc:
            raise ValueError(str(exc)) from None

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str | None) -> str | None:
        if value is not None and (not value or "#" in value or "+" in value or "\0" in value):
            raise ValueError("must be a non-empty topic name without wildcards")
        return value

    @model_validator(mode="after")
    def _fits_the_task(self) -> Self:
        task = self.task
        given = self.model_fields_set
        if (
            task in SNAPSHOT_TASKS
            and self.format is not None
            and self.format.lower() not in IMAGE_FORMATS
        ):
            raise ValueError(
                f"format {self.format!r} is not an image format"
                f" ({', '.join(sorted(IMAGE_FORMATS))})"
            )
        if (
            task == "clip-to-fs"
            and self.format is not None
            and self.format.lower() not in CLIP_FORMATS
        ):
            raise ValueError(
                f"format {self.format!r} is not a clip format ({', '.join(CLIP_FORMATS)})"
            )
        if task in STREAM_TASKS and self.format is not None:
            raise ValueError("format does not apply to re-streaming (the stream is copied)")
        if task in FS_TASKS and self.path is None:
            raise ValueError(f"{task} needs path")
        if task in STREAM_TASKS and not self.media_server_address:
            raise ValueError(f"{task} needs media_server_address")
        foreign = {
            "topic": task != "snapshot-to-mqtt",
            "qos": task != "snapshot-to-mqtt",
            "retain": task != "snapshot-to-mqtt",
            "ttl": task != "snapshot-to-mqtt",
            "path": task not in FS_TASKS,
            "duration": task != "clip-to-fs",
            "snapshots_per_second": task not in SNAPSHOT_TASKS,
            "media_server_address": task not in STREAM_TASKS,
            "media_server_ca_file": task != "stream-to-rtsps",
        }
        for field, misplaced in foreign.items():
            if misplaced and field in given:
                raise ValueError(f"{field} does not apply to {task}")
        return self

    @property
    def image_format(self) -> str:
        default = "jpeg" if self.task == "snapshot-to-mqtt" else "png"
        return IMAGE_FORMATS[(self.format or default).lower()]

    @property
    def clip_format(self) -> tuple[str, str]:
        """(FFmpeg muxer, file extension)."""
        return CLIP_FORMATS[(self.format or "mkv").lower()]

    def topic_for(self, camera: str) -> str:
        return self.topic or DEFAULT_TOPIC.format(camera=camera, stream=self.name)


class MqttSettings(Section):
    """The broker snapshot-to-mqtt publishes to."""

    url: str
    username: str | None = None
    password: SecretStr | None = None
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    client_id: str = Field(default_factory=lambda: f"tunnel-agent-{socket.gethostname()}")
    protocol: Literal[3, 5] = 5
    queue_size: Annotated[int, Field(ge=1, le=10_000)] = 32
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = parse_url(value, MQTT_SCHEMES)
        except InvalidUrl as exc:
            raise ValueError(f"{exc}: use mqtt://host[:port] or mqtts://host[:port]") from None
        if url.has_credentials:
            raise ValueError("put credentials in username and password, not in the URL")
        if url.path not in ("", "/") or url.query is not None or url.fragment is not None:
            raise ValueError("use mqtt://host[:port] or mqtts://host[:port], without a path")
        return value

    @property
    def tls(self) -> bool:
        return parse_url(self.url, MQTT_SCHEMES).scheme == "mqtts"

    @property
    def host_port(self) -> tuple[str, int]:
        url = parse_url(self.url, MQTT_SCHEMES)
        return url.host, url.port or (8883 if url.scheme == "mqtts" else 1883)

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MediaSettings(Section):
    """Tunables shared by all cameras' media work (times in seconds), and what the cloud may
    change through the ``mediaStreams`` twin property."""

    watchdog: Annotated[float, Field(gt=0, le=600)] = 10.0
    open_timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    # A media server that takes no more of the re-stream for this long is lost.
    server_write_timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    backoff_initial: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_max: Annotated[float, Field(gt=0, le=3600)] = 60.0
    stable_after: Annotated[float, Field(gt=0, le=3600)] = 60.0
    folder_image_interval: Annotated[float, Field(gt=0, le=3600)] = 1.0
    status_interval: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    # Relative stream paths (all of those from the twin) are folders under this one.
    output_root: Path = Path("/var/lib/tunnel-agent/media")
    # Streams on all cameras together, from the file and the twin: each costs a thread and a queue.
    max_streams: Annotated[int, Field(ge=0, le=1024)] = 16
    # Limits on what the twin may ask for (the file is the administrator's and is not limited).
    allowed_media_servers: list[Annotated[str, Field(min_length=1, max_length=253)]] = []
    allow_plain_restream_from_twin: bool = False
    max_snapshots_per_second: Annotated[float, Field(gt=0, le=60)] = 5.0

    def media_server_allowed(self, host: str) -> bool:
        """Whether the twin may send video to ``host`` (globs, any case; none by default)."""
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, p.lower()) for p in self.allowed_media_servers)
