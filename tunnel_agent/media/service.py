"""The media connector assembled from configuration: sources, tasks, the MQTT publisher.

Runs next to the tunnels in ``tunnel-agent run``. Cameras without streams cost nothing, not even
an import: PyAV, aiohttp and aiomqtt are loaded when the first stream (or ``[mqtt]``) needs them,
so a tunnels-only agent stays small. A task that fails never touches the others or the tunnels;
states and counters go to the log when they change and every ``status_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunnel_agent.aio import in_daemon_thread
from tunnel_agent.config.settings import AgentSettings, CameraSettings
from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.files import PathRefused, stream_folder
from tunnel_agent.media.settings import MediaSettings, StreamSettings
from tunnel_agent.media.urls import InvalidSource, SourceKind, parse_source

if TYPE_CHECKING:
    from tunnel_agent.media.http_source import HttpSnapshotSource
    from tunnel_agent.media.messages import OutgoingMessage
    from tunnel_agent.media.mqtt import MqttPublisher
    from tunnel_agent.media.rtsp_source import RtspCameraSource
    from tunnel_agent.media.source import CameraSource
    from tunnel_agent.media.tasks.base import MediaTask

WATCHDOG_EVERY_S = 1.0


class MediaError(Exception):
    """A stream that cannot run with this camera's source (said at start, for that stream only)."""


def _backoff(media: MediaSettings) -> Backoff:
    return Backoff(media.backoff_initial, media.backoff_max, media.stable_after)


def _folder(stream: StreamSettings, media: MediaSettings) -> Path:
    assert stream.path is not None
    try:
        return stream_folder(stream.path, media.output_root)
    except PathRefused as exc:
        raise MediaError(f"path {exc}") from None


class CameraMedia:
    """One camera: its source and its started tasks."""

    def __init__(self, camera: CameraSettings, media: MediaSettings, publish: Any) -> None:
        from tunnel_agent.media.source import CameraSource
        from tunnel_agent.media.tasks.base import FrameTask, PacketTask

        self.camera = camera
        self.log = EventLogger("tunnel_agent.media").bind(camera=camera.name)
        assert camera.url is not None
        password = camera.password.get_secret_value() if camera.password else None
        SECRETS.add(password)
        self.address = parse_source(camera.url, camera.username, password)
        self.tasks: list[MediaTask[Any]] = []
        for stream in camera.streams:
            if not stream.autostart:
                self.log.info(
                    "media.task_not_started", stream=stream.name, reason="autostart = false"
                )
                continue
            try:
                self.tasks.append(self._task(stream, media, publish))
            except MediaError as exc:
                self.log.error(
                    "media.task_refused", stream=stream.name, task=stream.task, reason=str(exc)
                )
        packet_tasks = [t for t in self.tasks if isinstance(t, PacketTask)]
        frame_tasks = [t for t in self.tasks if isinstance(t, FrameTask)]
        self.source: CameraSource | RtspCameraSource | HttpSnapshotSource | None = None
        if not self.tasks:
            return
        if self.address.kind is SourceKind.HTTP_SNAPSHOT:
            from tunnel_agent.media.http_source import HttpSnapshotSource  # aiohttp's client

            self.source = HttpSnapshotSource(camera.name, self.address, media, frame_tasks)
        elif self.address.kind is SourceKind.RTSP:
            # Read on the event loop by our own RTSP client: FFmpeg's reader costs a poll and a
            # read per RTP packet, in a thread of its own (issue 13's profile, bench/README.md).
            from tunnel_agent.media.rtsp_source import RtspCameraSource

            self.source = RtspCameraSource(
                camera.name, self.address, media, packet_tasks, frame_tasks, ca_file=camera.ca_file
            )
        else:
            self.source = CameraSource(
                camera.name, self.address, media, packet_tasks, frame_tasks, ca_file=camera.ca_file
            )

    def _task(self, stream: StreamSettings, media: MediaSettings, publish: Any) -> MediaTask[Any]:
        from tunnel_agent.media.tasks.clip import ClipToFs
        from tunnel_agent.media.tasks.restream import StreamToRtsp
        from tunnel_agent.media.tasks.snapshot import SnapshotToFs, SnapshotToMqtt

        kind = stream.task
        if self.address.kind is SourceKind.HTTP_SNAPSHOT and kind not in (
            "snapshot-to-mqtt",
            "snapshot-to-fs",
        ):
            raise MediaError(
                "an HTTP snapshot URL gives images, not video: use an rtsp, file or device url"
            )
        if kind == "snapshot-to-mqtt":
            return SnapshotToMqtt(self.camera.name, stream, _backoff(media), publish)
        if kind == "snapshot-to-fs":
            return SnapshotToFs(self.camera.name, stream, _backoff(media), _folder(stream, media))
        if kind == "clip-to-fs":
            return ClipToFs(self.camera.name, stream, _backoff(media), _folder(stream, media))
        return StreamToRtsp(
            self.camera.name,
            stream,
            _backoff(media),
            open_timeout_s=media.open_timeout,
            write_timeout_s=media.server_write_timeout,
        )

    def start(self) -> None:
        for task in self.tasks:
            task.start()
        if self.source is not None:
            self.source.start()

    async def stop(self) -> None:
        from tunnel_agent.media.source import CameraSource

        source = self.source
        if isinstance(source, CameraSource):
            await in_daemon_thread(source.stop, f"stop-source-{self.camera.name}")
        elif source is not None:
            await source.stop_async()
        await asyncio.gather(
            *(in_daemon_thread(t.stop, f"stop-{self.camera.name}-{t.name}") for t in self.tasks)
        )

    def status(self) -> dict[str, Any]:
        return {
            "source": self.source.status() if self.source else None,
            "tasks": {t.name: {"task": t.kind, **t.status()} for t in self.tasks},
        }


class MediaService:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.log = EventLogger("tunnel_agent.media")
        self.publisher: MqttPublisher | None = None
        if settings.mqtt is not None:
            from tunnel_agent.media.mqtt import MqttPublisher

            self.publisher = MqttPublisher(settings.mqtt, _backoff(settings.media))
        self.cameras: list[CameraMedia] = []
        self.camera_settings = {camera.name: camera for camera in settings.cameras}
        for camera in settings.cameras:
            self._add(camera)
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False

    def _add(self, camera: CameraSettings) -> CameraMedia | None:
        if not camera.streams:
            return None
        try:
            media = CameraMedia(camera, self.settings.media, self._publish)
        except InvalidSource as exc:
            self.log.error("media.camera_refused", camera=camera.name, reason=str(exc))
            return None
        self.cameras.append(media)
        return media

    async def replace_streams(self, camera_name: str, streams: list[StreamSettings]) -> None:
        """Run ``streams`` on the camera instead of what it runs now; tunnels are not touched."""
        for old in [c for c in self.cameras if c.camera.name == camera_name]:
            self.cameras.remove(old)
            await old.stop()
        updated = self.camera_settings[camera_name].model_copy(update={"streams": streams})
        self.camera_settings[camera_name] = updated
        started = self._add(updated)
        if started is not None and self._running:
            started.start()
        self.log.info(
            "media.streams_replaced",
            camera=camera_name,
            streams=",".join(s.name for s in streams) or "-",
        )

    def _publish(self, message: OutgoingMessage) -> None:
        if self.publisher is not None:
            self.publisher.offer(message)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        if self.publisher is not None:
            self._tasks.append(loop.create_task(self.publisher.run()))
            await asyncio.sleep(0)  # let the publisher bind to this loop before tasks offer to it
        for camera in self.cameras:
            camera.start()
        self._running = True
        self.log.info(
            "media.started",
            cameras=len(self.cameras),
            tasks=sum(len(c.tasks) for c in self.cameras),
        )
        last_status = time.monotonic()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), WATCHDOG_EVERY_S)
                now = time.monotonic()
                for camera in self.cameras:
                    if camera.source is not None:
                        camera.source.check_watchdog(now)
                if now - last_status >= self.settings.media.status_interval:
                    last_status = now
                    self.log_status()
        finally:
            await self._stop()

    def log_status(self) -> None:
        for camera in self.cameras:
            status = camera.status()
            source = status["source"] or {}
            self.log.info("media.source_status", camera=camera.camera.name, **source)
            for name, task in status["tasks"].items():
                self.log.info("media.task_status", camera=camera.camera.name, stream=name, **task)
        if self.publisher is not None:
            self.log.info(
                "media.mqtt_status",
                connected=self.publisher.connected,
                queued=self.publisher.queued,
                **dict(self.publisher.counters),
            )

    async def _stop(self) -> None:
        self._running = False
        await asyncio.gather(*(camera.stop() for camera in self.cameras))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.log_status()
        self.log.info("media.stopped")
