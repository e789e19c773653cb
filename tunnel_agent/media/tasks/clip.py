"""clip-to-fs: back-to-back clips cut at keyframes, copied without re-encoding, crash-safe.

A clip starts on a keyframe and ends on the first keyframe at or after ``duration`` seconds, which
also starts the next clip, so nothing falls between two clips and each lasts the requested time
within one keyframe interval. It is written under a temporary name, flushed to disk and renamed when
complete. MP4 and MOV are written fragmented (the header at the front, then one fragment per
keyframe interval) so that, like MKV or MPEG-TS, a clip cut short by a crash is readable up to its
last complete fragment.

A temporary clip found at start is what a crash (``kill -9``, a power cut) interrupted: what is
readable of it, from its first keyframe, is copied into a final clip named like the others; a
temporary without a readable keyframe is removed. Either way the log says which.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import av.container
import av.stream

from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.files import final_path, is_scratch, publish, scratch_path, temporary_path
from tunnel_agent.media.packets import MediaPacket, StreamTemplate
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import PacketTask, TaskError
from tunnel_agent.media.tasks.output import OutputFolder

FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
MUXER_OPTIONS = {"mp4": FRAGMENTED, "mov": FRAGMENTED}


def salvage_clip(partial: Path, final: Path, muxer: str) -> int:
    """Copy what is readable of ``partial`` (from its first keyframe) into ``final`` and remove
    ``partial``; return the packets kept. 0 means nothing worth keeping, and no file written.

    The last packet read is left out: a file cut short may have cut it too.
    """
    scratch = scratch_path(final)
    kept = 0
    try:
        with av.open(str(partial), "r") as source:
            if not source.streams.video:
                return 0
            stream = source.streams.video[0]
            output = av.open(str(scratch), "w", format=muxer, options=MUXER_OPTIONS.get(muxer, {}))
            try:
                target: Any = output.add_stream_from_template(stream)
                previous: av.Packet[Any] | None = None
                for packet in _readable_from_keyframe(source, stream):
                    if previous is not None:
                        previous.stream = target
                        try:
                            output.mux(previous)
                        except (av.FFmpegError, ValueError):
                            break
                        kept += 1
                    previous = packet
            finally:
                with contextlib.suppress(av.FFmpegError, OSError):
                    output.close()
    except (av.FFmpegError, OSError, ValueError):
        pass  # unreadable from the start: nothing kept
    if kept == 0:
        scratch.unlink(missing_ok=True)
        return 0
    publish(scratch, final)
    partial.unlink(missing_ok=True)
    return kept


def _readable_from_keyframe(
    source: av.container.InputContainer, stream: av.stream.Stream
) -> Iterator[av.Packet[Any]]:
    """Packets with increasing timestamps from the first keyframe, until the file stops making
    sense."""
    last_dts: int | None = None
    try:
        for packet in source.demux(stream):
            if packet.dts is None or packet.size == 0:
                continue
            if last_dts is None and not packet.is_keyframe:
                continue
            if last_dts is not None and packet.dts <= last_dts:
                continue
            last_dts = packet.dts
            yield packet
    except (av.FFmpegError, EOFError, ValueError):
        return


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
    batch_s = 0.5  # files: latency does not matter, wake-ups do
    queue_size = 40  # batches: ~20 s of video, so a slow disk may lag, not the camera

    def __init__(
        self, camera: str, settings: StreamSettings, backoff: Backoff, folder: Path
    ) -> None:
        super().__init__(camera, settings, backoff)
        self.muxer, self.extension = settings.clip_format
        self.output = OutputFolder(self, settings, self.extension, folder, self._recover)
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
        options = MUXER_OPTIONS.get(self.muxer, {})
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
        try:
            size_bytes = clip.temporary.stat().st_size
            publish(clip.temporary, clip.final)
        except OSError as exc:
            clip.temporary.unlink(missing_ok=True)
            self.output.check_again()
            raise TaskError(f"cannot finish {clip.final.name}: {exc.strerror or exc}") from None
        self.counters["clips"] += 1
        self.counters["bytes_written"] += size_bytes
        self.log.info("media.clip_written", file=clip.final.name, packets=clip.packets)
        self.output.published(clip.final, size_bytes, time.time())

    def begin(self) -> None:
        self.output.prepare()

    def _recover(self, leftover: Path) -> None:
        """A temporary clip a crash left: salvage what is readable, else remove it."""
        if is_scratch(leftover):  # a salvage that was itself interrupted: the partial remains
            leftover.unlink(missing_ok=True)
            return
        final = final_path(leftover)
        kept = salvage_clip(leftover, final, self.muxer)
        if kept:
            self.counters["partial_clips_salvaged"] += 1
            self.log.warning("media.partial_clip_salvaged", file=final.name, packets=kept)
        else:
            leftover.unlink(missing_ok=True)
            self.counters["partial_files_removed"] += 1
            self.log.warning(
                "media.partial_clip_removed", file=leftover.name, reason="no readable keyframe"
            )

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
