"""snapshot-to-fs and snapshot-to-mqtt: encode paced frames as images and deliver them."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import av

from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.encode import CONTENT_TYPES, ImageEncoder
from tunnel_agent.media.files import write_atomically
from tunnel_agent.media.messages import OutgoingMessage
from tunnel_agent.media.packets import CapturedFrame
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import FrameTask, TaskError
from tunnel_agent.media.tasks.output import OutputFolder

EXTENSIONS = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "tiff": "tiff"}


def image_bytes(captured: CapturedFrame, encoder: ImageEncoder) -> bytes:
    """The capture in the encoder's format: passed through when it already is, else (re)encoded."""
    if captured.image is not None:
        if captured.image_format == encoder.image_format:
            return captured.image
        with av.open(io.BytesIO(captured.image), "r") as container:
            frame = next(container.decode(video=0))
        return encoder.encode(frame)
    if captured.frame is None:
        raise TaskError("nothing to encode")
    return encoder.encode(captured.frame)


class SnapshotToFs(FrameTask):
    def __init__(
        self, camera: str, settings: StreamSettings, backoff: Backoff, folder: Path
    ) -> None:
        super().__init__(camera, settings, backoff)
        self.encoder = ImageEncoder(settings.image_format)
        self.output = OutputFolder(self, settings, EXTENSIONS[settings.image_format], folder)

    def begin(self) -> None:
        self.output.prepare()

    def handle(self, item: CapturedFrame) -> None:
        if not self.output.has_room():
            return
        data = image_bytes(item, self.encoder)
        target = self.output.next_file(item.captured_at)
        try:
            write_atomically(target, data)
        except OSError as exc:
            self.output.check_again()
            raise TaskError(f"cannot write {target.name}: {exc.strerror or exc}") from None
        self.counters["snapshots"] += 1
        self.counters["bytes_written"] += len(data)
        self.running()
        self.output.published(target, len(data), time.time())

    def reset(self) -> None:
        self.output.check_again()


class SnapshotToMqtt(FrameTask):
    def __init__(
        self,
        camera: str,
        settings: StreamSettings,
        backoff: Backoff,
        publish: Callable[[OutgoingMessage], None],
    ) -> None:
        super().__init__(camera, settings, backoff)
        self.publish = publish
        self.image_format = settings.image_format
        self.encoder = ImageEncoder(self.image_format)
        self.topic = settings.topic_for(camera)
        self._sequence = 0

    def handle(self, item: CapturedFrame) -> None:
        data = image_bytes(item, self.encoder)
        self._sequence += 1
        self.publish(
            OutgoingMessage(
                topic=self.topic,
                payload=data,
                qos=self.settings.qos,
                retain=self.settings.retain,
                expiry_s=self.settings.ttl or None,
                content_type=CONTENT_TYPES[self.image_format],
                user_properties=(
                    (
                        "capturedAt",
                        item.captured_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    ),
                    ("sequence", str(self._sequence)),
                    ("camera", self.camera),
                    ("stream", self.name),
                ),
            )
        )
        self.counters["snapshots"] += 1
        self.running()
