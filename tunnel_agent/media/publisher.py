"""The re-stream publisher: a child process that owns one RTSP output session.

PyAV holds the GIL while FFmpeg writes an output's header, and for RTSP that is the whole
handshake with the media server (TCP, TLS, ANNOUNCE, SETUP, RECORD): in the agent's own process
a slow or silent server would stop every thread, tunnels and the hub link included, for as long
as FFmpeg waits. Here it stops only this process. The agent feeds it (see ``publish_wire``) and
reads its answers; run as ``python -m tunnel_agent.media.publisher``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from fractions import Fraction
from typing import Any, BinaryIO

import av
import av.container

from tunnel_agent import malloc
from tunnel_agent.media.publish_wire import (
    OPEN,
    PACKET,
    TEMPLATE,
    parse_open,
    parse_packet,
    read_frame,
)
from tunnel_agent.media.tcp_deadline import limit_unacknowledged, tcp_sockets_to_port


def reason(exc: BaseException) -> str:
    """FFmpeg's message without the URL it may quote (which could hold the password)."""
    text = str(exc)
    return text.split(": '", 1)[0] if ": '" in text else text


def answer(**fields: object) -> None:
    os.write(sys.stdout.fileno(), json.dumps(fields).encode() + b"\n")


class Session:
    def __init__(self, output: av.container.OutputContainer, stream: Any) -> None:
        self.output = output
        self.stream = stream
        self._time_base = Fraction(1, 1)

    def mux(self, payload: bytes) -> None:
        pts, dts, num, den, keyframe, data = parse_packet(payload)
        if (num, den) != (self._time_base.numerator, self._time_base.denominator):
            self._time_base = Fraction(num, den)
        packet = av.Packet(data)
        packet.dts = dts
        packet.pts = pts if pts is not None else dts
        packet.time_base = self._time_base
        packet.is_keyframe = keyframe
        packet.stream = self.stream
        self.output.mux(packet)

    def close(self) -> None:
        with contextlib.suppress(av.FFmpegError, OSError, ValueError):
            self.output.close()


def open_session(open_payload: bytes, template: bytes) -> Session:
    request = parse_open(open_payload)
    with av.open(io.BytesIO(template), "r", format="matroska") as holder:
        before = tcp_sockets_to_port(request.server_port)
        output = av.open(request.url, "w", format="rtsp", options=request.options)
        try:
            stream = output.add_stream_from_template(holder.streams[0])
            output.start_encoding()  # the handshake with the media server
        except BaseException:
            with contextlib.suppress(av.FFmpegError, OSError, ValueError):
                output.close()
            raise
    ours = {fd for fd, _ in tcp_sockets_to_port(request.server_port) - before}
    bounded = limit_unacknowledged(ours, request.write_timeout_s) > 0
    answer(connected=True, write_bounded=bounded, arena_max=malloc.applied().arena_max)
    return Session(output, stream)


def serve(source: BinaryIO) -> int:
    opening = read_frame(source)
    templating = read_frame(source)
    if opening is None or templating is None or (opening[0], templating[0]) != (OPEN, TEMPLATE):
        return 2
    try:
        session = open_session(opening[1], templating[1])
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        answer(error=reason(exc), opened=False)
        return 1
    try:
        while (item := read_frame(source)) is not None:
            if item[0] == PACKET:
                session.mux(item[1])
    except (av.FFmpegError, OSError, ValueError) as exc:
        answer(error=reason(exc), opened=True)
        return 1
    finally:
        session.close()
    return 0


def main() -> int:
    malloc.tune()  # as the agent does for itself, before FFmpeg starts any thread
    return serve(sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
