"""stream-to-rtsp / stream-to-rtsps: publish the camera to a media server, copied, over TCP.

The output is an RTSP ANNOUNCE/RECORD session. Camera side and server side recover on their own:
a lost camera connection gives a new stream template and the output is re-announced; a lost
server fails this task only, which reconnects on the next keyframe after its backoff. For RTSPS the
server's certificate is verified (FFmpeg does not unless told to). The open is bounded by FFmpeg's
``timeout`` option (connect and every read of the handshake); writes are bounded by the kernel
(see ``tcp_deadline``), as nothing in FFmpeg or PyAV bounds a write to an RTSP output.
"""

from __future__ import annotations

import contextlib
from typing import Any

import av
import av.container

from tunnel_agent.logs import SECRETS
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.packets import MediaPacket, StreamTemplate
from tunnel_agent.media.settings import StreamSettings
from tunnel_agent.media.tasks.base import PacketTask, TaskError
from tunnel_agent.media.tcp_deadline import limit_unacknowledged, tcp_sockets_to_port
from tunnel_agent.media.urls import redact_url, with_credentials


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
        self._output: av.container.OutputContainer | None = None
        self._stream: Any = None
        self._offset = 0

    def handle(self, item: MediaPacket | StreamTemplate) -> None:
        if isinstance(item, StreamTemplate):
            self._close_output()
            self._template = item
            return
        template = self._template
        if template is None or item.generation != template.generation:
            return
        if self._output is None:
            if not item.is_keyframe:
                self.counters["skipped_until_keyframe"] += 1
                return
            self._open(template, item)
        assert self._output is not None
        try:
            self._output.mux(item.to_av(self._stream, self._offset))
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise TaskError(f"lost {self.display}: {_reason(exc)}") from None
        self.counters["packets"] += 1
        self.running()

    def _open(self, template: StreamTemplate, first: MediaPacket) -> None:
        port = self.settings.media_server_port
        before = tcp_sockets_to_port(port)
        try:
            output = av.open(
                self.url,
                "w",
                format="rtsp",
                options=output_options(self.settings, self.open_timeout_s),
            )
        except (av.FFmpegError, OSError) as exc:
            raise TaskError(f"cannot publish to {self.display}: {_reason(exc)}") from None
        try:
            stream = output.add_stream_from_template(template.stream)
            # FFmpeg connects (TCP, TLS, ANNOUNCE, RECORD) only when the header is written:
            # do it now, so that a refused server is "cannot publish", not a lost connection.
            output.start_encoding()
        except (av.FFmpegError, OSError, ValueError) as exc:
            with contextlib.suppress(av.FFmpegError, OSError, ValueError):
                output.close()
            raise TaskError(f"cannot publish to {self.display}: {_reason(exc)}") from None
        ours = {fd for fd, _ in tcp_sockets_to_port(port) - before}
        if not limit_unacknowledged(ours, self.write_timeout_s):
            self.log.warning("media.restream_write_unbounded", server=self.display)
        self._output = output
        self._stream = stream
        self._offset = first.dts
        self.counters["connects"] += 1
        self.log.info("media.restream_connected", server=self.display, codec=template.codec)

    def _close_output(self) -> None:
        output, self._output = self._output, None
        if output is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                output.close()

    def reset(self) -> None:
        self._close_output()

    def close(self) -> None:
        self._close_output()


def _reason(exc: BaseException) -> str:
    """FFmpeg's message without the URL it may quote (which could hold the password)."""
    text = str(exc)
    return text.split(": '", 1)[0] if ": '" in text else text
