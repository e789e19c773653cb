"""stream-to-rtsp / stream-to-rtsps: publish the camera to a media server, copied, over TCP.

The output is an RTSP ANNOUNCE/RECORD session, run by a publisher process of its own
(``tunnel_agent.media.publisher``): FFmpeg's handshake with the server holds the GIL, so in this
process a slow or silent server would freeze every tunnel. Camera side and server side recover on
their own: a lost camera connection gives a new stream template and the output is re-announced;
a lost server fails this task only, which reconnects on the next keyframe after its backoff. For
RTSPS the server's certificate is verified (FFmpeg does not unless told to). The open is bounded
by FFmpeg's ``timeout`` option (connect and every read of the handshake) and by a deadline here;
writes are bounded by the kernel (see ``tcp_deadline``), as nothing in FFmpeg or PyAV bounds a
write to an RTSP output, and by a deadline on the pipe to the publisher.
"""

from __future__ import annotations

import contextlib
import threading

from tunnel_agent.logs import SECRETS
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.packets import MediaPacket, StreamTemplate
from tunnel_agent.media.publish_wire import OpenRequest, open_frame, packet_frame, template_frame
from tunnel_agent.media.publisher_process import PublisherError, PublisherProcess
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import PacketTask, TaskError
from tunnel_agent.media.urls import redact_url, with_credentials

# Starting a publisher (an interpreter that imports PyAV) on a slow board, before the handshake.
PUBLISHER_START_S = 20.0
# The handshake's waits, each bounded by FFmpeg's timeout: connect, OPTIONS, ANNOUNCE, SETUP,
# RECORD (TLS adds one more for RTSPS).
HANDSHAKE_WAITS = 6
# Beyond the kernel's bound on the publisher's socket: how long the publisher may take nothing.
PIPE_MARGIN_S = 5.0


def server_url(settings: StreamSettings) -> str:
    scheme = "rtsps" if settings.task == "stream-to-rtsps" else "rtsp"
    host = settings.media_server_address or ""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    path = settings.media_server_path.lstrip("/")
    url = f"{scheme}://{host}:{settings.media_server_port}/{path}"
    password = (
        settings.media_server_password.get_secret_value()
        if settings.media_server_password
        else None
    )
    return with_credentials(url, settings.media_server_username, password)


def output_options(settings: StreamSettings, open_timeout_s: float) -> dict[str, str]:
    options = {"rtsp_transport": "tcp", "timeout": str(round(open_timeout_s * 1_000_000))}
    if settings.task == "stream-to-rtsps":
        options["tls_verify"] = "1"
        if settings.media_server_ca_file is not None:
            options["ca_file"] = str(settings.media_server_ca_file)
    return options


class StreamToRtsp(PacketTask):
    queue_size = 64  # batches of batch_s (0.1 s): a few seconds of video

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
        self.url = server_url(settings)
        self.display = redact_url(self.url)
        if settings.media_server_password is not None:
            SECRETS.add(settings.media_server_password.get_secret_value())
        self._template: StreamTemplate | None = None
        self._publisher: PublisherProcess | None = None
        self._pending: list[bytes] = []
        self._offset = 0
        self._stopping = threading.Event()
        self._publisher_lock = threading.Lock()

    def stop(self) -> None:
        """Also ends an open in progress: the publisher is killed, the thread is free at once."""
        self._stopping.set()
        with self._publisher_lock:
            publisher = self._publisher
        if publisher is not None:
            publisher.kill()
        super().stop()

    def handle(self, item: MediaPacket | StreamTemplate) -> None:
        if isinstance(item, StreamTemplate):
            self._close_output()
            self._template = item
            return
        template = self._template
        if template is None or item.generation != template.generation:
            return
        if self._publisher is None:
            if not item.is_keyframe:
                self.counters["skipped_until_keyframe"] += 1
                return
            if not self._open(template, item):
                return
        self._pending.append(packet_frame(item, self._offset))
        self.counters["packets"] += 1

    def after_batch(self) -> None:
        publisher = self._publisher
        if publisher is None or not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        try:
            publisher.send(data, self.write_timeout_s + PIPE_MARGIN_S)
        except PublisherError as exc:
            self._forget_publisher()
            if self._stopping.is_set():
                return
            raise TaskError(f"lost {self.display}: {exc}") from None
        self.running()

    def _open(self, template: StreamTemplate, first: MediaPacket) -> bool:
        """Connect a publisher; False when the task is stopping meanwhile."""
        request = OpenRequest(
            url=self.url,
            options=output_options(self.settings, self.open_timeout_s),
            write_timeout_s=self.write_timeout_s,
            server_port=self.settings.media_server_port,
        )
        frames = open_frame(request) + template_frame(template, first)
        with self._publisher_lock:
            if self._stopping.is_set():
                return False
            publisher = self._publisher = PublisherProcess()
        try:
            answer = publisher.open(
                frames, PUBLISHER_START_S + HANDSHAKE_WAITS * self.open_timeout_s
            )
        except PublisherError as exc:
            self._forget_publisher()
            if self._stopping.is_set():
                return False
            verb = "lost" if exc.opened else "cannot publish to"
            raise TaskError(f"{verb} {self.display}: {exc}") from None
        if not answer.get("write_bounded"):
            self.log.warning("media.restream_write_unbounded", server=self.display)
        self._offset = first.dts
        self.counters["connects"] += 1
        self.log.info(
            "media.restream_connected",
            server=self.display,
            codec=template.codec,
            publisher_arena_max=answer.get("arena_max"),
        )
        return True

    def _forget_publisher(self) -> None:
        with self._publisher_lock:
            self._publisher = None
        self._pending = []

    def _close_output(self) -> None:
        with contextlib.suppress(TaskError):  # hand over what is pending; a failure changes nothing
            self.after_batch()
        with self._publisher_lock:
            publisher, self._publisher = self._publisher, None
        self._pending = []
        if publisher is not None:
            publisher.close()

    def reset(self) -> None:
        self._close_output()

    def close(self) -> None:
        self._close_output()
