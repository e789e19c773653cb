"""stream-to-rtsp / stream-to-rtsps: publish the camera to a media server, copied, over TCP.

The output is an RTSP ANNOUNCE/RECORD session (``tunnel_agent.rtsp.publisher``) on the agent's
event loop: the handshake and every write are the loop's non-blocking I/O with deadlines, so a
slow or silent server costs this task its session, never a blocked thread. The task's thread turns
each batch of packets into interleaved RTP (``tunnel_agent.rtsp.packetize``) and hands the loop one
buffer per batch: one socket write per 0.1 s of video.

Camera side and server side recover on their own: a lost camera connection gives a new stream
template and the output is announced again; a lost server fails this task only, which reconnects
on the next keyframe after its backoff. A server that reads too slowly for the stream is not
queued for without bound: past ``MAX_QUEUED_BYTES`` waiting the rest of the group of pictures is
dropped and the stream starts again at a keyframe (counted, logged once per session). For RTSPS
the server's certificate is verified, against ``media_server_ca_file`` or the system store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import ssl

from tunnel_agent.logs import SECRETS
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.packets import MediaPacket, StreamTemplate
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import PacketTask, TaskError
from tunnel_agent.media.urls import redact_url, with_credentials
from tunnel_agent.rtsp.packetize import (
    CLOCK_RATE_HZ,
    Piece,
    UnsupportedStream,
    VideoFormat,
    VideoPacketizer,
    media_description,
    session_description,
)
from tunnel_agent.rtsp.publisher import TRACK_CONTROL, PublishError, RtspPublisher

# The handshake's waits, each bounded by ``open_timeout``: connect (with TLS), OPTIONS, ANNOUNCE,
# SETUP, RECORD, and a repeat of each request that answers an authentication challenge.
HANDSHAKE_WAITS = 9
# Bytes waiting for a slow server before video is dropped: about 2 s of a 4 Mbit/s camera.
MAX_QUEUED_BYTES = 1 << 20
CLOSE_WAIT_S = 3.0  # TEARDOWN is waited for 1 s; this bounds the hand-over to the loop as well


def server_url(settings: StreamSettings, *, credentials: bool = True) -> str:
    scheme = "rtsps" if settings.task == "stream-to-rtsps" else "rtsp"
    host = settings.media_server_address or ""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    path = settings.media_server_path.lstrip("/")
    url = f"{scheme}://{host}:{settings.media_server_port}/{path}"
    if not credentials:
        return url
    password = (
        settings.media_server_password.get_secret_value()
        if settings.media_server_password
        else None
    )
    return with_credentials(url, settings.media_server_username, password)


def tls_context(settings: StreamSettings) -> ssl.SSLContext | None:
    """For RTSPS: the server's certificate and name verified (the CA file, else the system's)."""
    if settings.task != "stream-to-rtsps":
        return None
    ca_file = settings.media_server_ca_file
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise TaskError(f"cannot read media_server_ca_file {ca_file}: {exc}") from None


def rtp_time(packet: MediaPacket) -> int:
    """The packet's presentation time on the 90 kHz RTP clock."""
    pts = packet.pts if packet.pts is not None else packet.dts
    base = packet.time_base
    return pts * CLOCK_RATE_HZ * base.numerator // base.denominator


class StreamToRtsp(PacketTask):
    queue_size = 64  # batches of batch_s (0.1 s): a few seconds of video
    max_queued_bytes = MAX_QUEUED_BYTES

    def __init__(
        self,
        camera: str,
        settings: StreamSettings,
        backoff: Backoff,
        *,
        open_timeout_s: float,
        write_timeout_s: float,
    ) -> None:
        super().__init__(camera, settings, backoff)
        self.open_timeout_s = open_timeout_s
        self.write_timeout_s = write_timeout_s
        self.url = server_url(settings, credentials=False)
        self.display = redact_url(server_url(settings))
        if settings.media_server_password is not None:
            SECRETS.add(settings.media_server_password.get_secret_value())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl: ssl.SSLContext | None = None
        self._template: StreamTemplate | None = None
        self._video: VideoFormat | None = None
        self._publisher: RtspPublisher | None = None
        self._packetizer: VideoPacketizer | None = None
        self._rtp_offset = 0
        self._pending: list[Piece] = []
        self._pending_packets = 0
        self._dropping = False
        self._refused_seen = 0
        self._slow_logged = False
        self._opening: concurrent.futures.Future[RtspPublisher] | None = None
        self._stopping = False

    def start(self) -> None:
        """Called on the agent's event loop, which then carries this task's RTSP session."""
        self._loop = asyncio.get_running_loop()
        super().start()

    def stop(self) -> None:
        """Also ends an open in progress: the thread is free at once."""
        self._stopping = True
        opening = self._opening
        if opening is not None:
            opening.cancel()
        super().stop()

    # -- the task's thread ----------------------------------------------------------------------

    def handle(self, item: MediaPacket | StreamTemplate) -> None:
        if isinstance(item, StreamTemplate):
            self._close_output()
            self._template = item
            self._video = None
            return
        template = self._template
        if template is None or item.generation != template.generation:
            return
        publisher = self._publisher
        if publisher is None:
            if not item.is_keyframe:
                self.counters["skipped_until_keyframe"] += 1
                return
            publisher = self._open(template, item)
            if publisher is None:
                return
        elif publisher.error is not None:
            raise TaskError(f"lost {self.display}: {publisher.error}")
        if self._behind(publisher, item):
            return
        assert self._video is not None and self._packetizer is not None
        units = self._video.with_parameter_sets(self._video.units(item.data), item.is_keyframe)
        self._packetizer.packetize(units, self._rtp_offset + rtp_time(item), self._pending)
        self._pending_packets += 1
        self.counters["packets"] += 1

    def after_batch(self) -> None:
        publisher, loop = self._publisher, self._loop
        if publisher is None or loop is None:
            return
        if publisher.error is not None:
            raise TaskError(f"lost {self.display}: {publisher.error}")
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending, self._pending_packets = [], 0
        try:
            loop.call_soon_threadsafe(publisher.send, data)
        except RuntimeError:  # the loop is closed: the agent is going away
            return
        self.counters["batches"] += 1
        self.running()

    def _behind(self, publisher: RtspPublisher, item: MediaPacket) -> bool:
        """Whether to drop ``item`` because the server is not keeping up: from the moment it
        falls behind, the rest of the group of pictures; it starts again at a keyframe."""
        refused = publisher.refused_batches
        if not self._dropping and (publisher.congested or refused != self._refused_seen):
            self._dropping = True
            self.counters["gops_dropped_slow_server"] += 1
            # What waits in this batch belongs to the broken group of pictures too.
            self.counters["packets_dropped_slow_server"] += self._pending_packets
            self._pending, self._pending_packets = [], 0
            if not self._slow_logged:
                self._slow_logged = True
                self.log.warning(
                    "media.restream_behind",
                    server=self.display,
                    queued_limit_bytes=self.max_queued_bytes,
                    action="dropping video until the next keyframe",
                )
        if self._dropping:
            if item.is_keyframe and not publisher.congested:
                self._dropping = False
                self._refused_seen = publisher.refused_batches
                return False
            self.counters["packets_dropped_slow_server"] += 1
            return True
        return False

    def _open(self, template: StreamTemplate, first: MediaPacket) -> RtspPublisher | None:
        """Announce the stream and start recording; None when the task is stopping meanwhile."""
        video = self._video
        try:
            if video is None:
                context = template.stream.codec_context
                video = VideoFormat.from_extradata(template.codec, context.extradata)
                self._video = video
            if not video.complete:  # the parameter sets travel in the stream only
                video.remember(video.units(first.data))
            sdp = session_description(media_description(video, TRACK_CONTROL), "0.0.0.0")
        except UnsupportedStream as exc:
            raise TaskError(f"cannot publish to {self.display}: {exc}") from None
        if self._ssl is None:
            self._ssl = tls_context(self.settings)
        loop = self._loop
        if loop is None or self._stopping:
            return None
        try:
            opening = asyncio.run_coroutine_threadsafe(self._connect(sdp), loop)
        except RuntimeError:  # the loop is closed
            return None
        self._opening = opening
        if self._stopping:
            opening.cancel()
        try:
            publisher = opening.result(HANDSHAKE_WAITS * self.open_timeout_s)
        except concurrent.futures.CancelledError:
            return None
        except concurrent.futures.TimeoutError:
            opening.cancel()
            raise TaskError(f"cannot publish to {self.display}: no answer in time") from None
        except PublishError as exc:
            raise TaskError(f"cannot publish to {self.display}: {exc}") from None
        finally:
            self._opening = None
        self._publisher = publisher
        self._packetizer = VideoPacketizer(video.codec, channel=0)
        self._rtp_offset = int.from_bytes(os.urandom(4)) - rtp_time(first)
        self._dropping, self._refused_seen, self._slow_logged = False, 0, False
        if not publisher.write_bounded:
            self.log.warning("media.restream_write_unbounded", server=self.display)
        self.counters["connects"] += 1
        self.log.info("media.restream_connected", server=self.display, codec=video.codec)
        return publisher

    async def _connect(self, sdp: str) -> RtspPublisher:
        """On the loop: connect and record, every wait bounded by ``open_timeout``."""
        settings = self.settings
        password = settings.media_server_password
        publisher = RtspPublisher(
            self.url,
            username=settings.media_server_username,
            password=password.get_secret_value() if password else None,
            request_timeout_s=self.open_timeout_s,
            write_timeout_s=self.write_timeout_s,
            max_queued_bytes=self.max_queued_bytes,
        )
        try:
            await publisher.connect(
                settings.media_server_address or "", settings.media_server_port, self._ssl
            )
            await publisher.record(sdp)
        except BaseException:
            publisher.abort("the session was not opened")
            raise
        return publisher

    def _close_output(self) -> None:
        """Hand over what is pending, then TEARDOWN (bounded) and close the connection."""
        publisher, loop = self._publisher, self._loop
        if publisher is not None and publisher.error is None:
            with contextlib.suppress(TaskError):  # lost meanwhile: nothing more to hand over
                self.after_batch()
        self._publisher, self._pending, self._pending_packets = None, [], 0
        if publisher is None or loop is None:
            return
        try:
            closing = asyncio.run_coroutine_threadsafe(publisher.close(), loop)
        except RuntimeError:  # the loop is closed: its transports are gone with it
            return
        try:
            closing.result(CLOSE_WAIT_S)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            loop.call_soon_threadsafe(publisher.abort, "the session was closed")

    def reset(self) -> None:
        self._close_output()

    def close(self) -> None:
        self._close_output()
