"""clip-to-fs: back-to-back clips cut at keyframes, copied without re-encoding, crash-safe.

A clip starts on a keyframe and ends on the first keyframe at or after ``duration`` seconds, which
also starts the next clip, so nothing falls between two clips and each lasts the requested time
within one keyframe interval. It is written under a temporary name and renamed when complete; MP4
and MOV get their index at the front (``+faststart``).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import av.container
import av.stream

from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.files import temporary_path
from tunnel_agent.media.packets import MediaPacket, StreamTemplate
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import PacketTask, TaskError
from tunnel_agent.media.tasks.output import OutputFolder

FASTSTART = {"mp4", "mov"}


class _OpenClip:
    def __init__(
        self,
        final: Path,
        container: av.container.OutputContainer,
        stream: av.stream.Stream,
        first: MediaPacket,
    ) -> None:
        self.final = final
        self.temporary = temporary_path(final)
        self.container = container
        self.stream = stream
        self.offset = first.dts
        self.start_s = first.seconds
        self.packets = 0


class ClipToFs(PacketTask):
    queue_size = 512  # a few seconds of video: a slow disk may lag, not the camera

    def __init__(self, camera: str, settings: StreamSettings, backoff: Backoff) -> None:
        super().__init__(camera, settings, backoff)
        self.muxer, self.extension = settings.clip_format
        self.output = OutputFolder(self, settings, self.extension)
        self._template: StreamTemplate | None = None
        self._clip: _OpenClip | None = None

    def handle(self, item: MediaPacket | StreamTemplate) -> None:
        if isinstance(item, StreamTemplate):
            self._finish()  # a new connection: its timestamps start over
            self._template = item
            return
        template = self._template
        if template is None or item.generation != template.generation:
            return
        clip = self._clip
        if (
            clip is not None
            and item.is_keyframe
            and item.seconds - clip.start_s >= self.settings.duration
        ):
            self._finish()
            clip = None
        if clip is None:
            if not item.is_keyframe:
                self.counters["skipped_until_keyframe"] += 1
                return
            clip = self._open(template, item)
            if clip is None:
                return
        try:
            clip.container.mux(item.to_av(clip.stream, clip.offset))
        except (av.FFmpegError, ValueError) as exc:
            raise TaskError(f"cannot write {template.codec} into {self.extension}: {exc}") from None
        clip.packets += 1
        self.counters["packets"] += 1
        self.running()

    def _open(self, template: StreamTemplate, first: MediaPacket) -> _OpenClip | None:
        if not self.output.has_room():
            return None
        final = self.output.next_file(datetime.fromtimestamp(first.captured_at, tz=UTC))
        options = {"movflags": "+faststart"} if self.muxer in FASTSTART else {}
        try:
            container = av.open(str(temporary_path(final)), "w", format=self.muxer, options=options)
        except (av.FFmpegError, OSError) as exc:
            self.output.check_again()
            raise TaskError(f"cannot create {final.name}: {exc}") from None
        stream: Any = container.add_stream_from_template(template.stream)
        self._clip = _OpenClip(final, container, stream, first)
        return self._clip

    def _finish(self) -> None:
        clip, self._clip = self._clip, None
        if clip is None:
            return
        try:
            clip.container.close()
        except (av.FFmpegError, OSError) as exc:
            clip.temporary.unlink(missing_ok=True)
            raise TaskError(f"cannot finish {clip.final.name}: {exc}") from None
        if clip.packets == 0:
            clip.temporary.unlink(missing_ok=True)
            return
        clip.temporary.replace(clip.final)
        self.counters["clips"] += 1
        self.log.info("media.clip_written", file=clip.final.name, packets=clip.packets)
        self.output.prune()

    def reset(self) -> None:
        clip, self._clip = self._clip, None
        self.output.check_again()
        if clip is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                clip.container.close()
            clip.temporary.unlink(missing_ok=True)

    def close(self) -> None:
        """On a clean stop the clip in progress is completed (shorter), so nothing is lost."""
        self._finish()
