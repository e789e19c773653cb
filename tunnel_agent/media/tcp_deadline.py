"""Bound how long the kernel keeps unacknowledged data on a TCP socket that FFmpeg owns.

FFmpeg's RTSP muxer ignores the result of its socket writes, and PyAV gives output containers
no interrupt callback, so neither FFmpeg's ``timeout`` option nor PyAV's ``timeout=`` can end a
write to a media server that accepted the session and then stopped reading: each write waits,
is dropped, and the next one waits again. ``TCP_USER_TIMEOUT`` makes the kernel abort the
connection once sent data has gone unacknowledged (or the peer's window has stayed closed) for
that long; the muxer then sees the broken connection on its next packet and fails.
"""

from __future__ import annotations

import os
import socket

FD_FOLDER = "/proc/self/fd"


def tcp_sockets_to_port(port: int) -> set[tuple[int, str]]:
    """This process's TCP sockets connected to ``port`` on any host, as (fd, local address).

    The local address tells a new socket from an old one that had the same descriptor number.
    """
    found: set[tuple[int, str]] = set()
    for name in os.listdir(FD_FOLDER):
        fd = int(name)
        probe = _socket_copy(fd)
        if probe is None:
            continue
        with probe:
            if probe.type != socket.SOCK_STREAM or probe.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            try:
                peer_port = probe.getpeername()[1]
            except OSError:  # not connected
                continue
            if peer_port == port:
                found.add((fd, str(probe.getsockname())))
    return found


def limit_unacknowledged(fds: set[int], timeout_s: float) -> int:
    """Set ``TCP_USER_TIMEOUT`` on ``fds``; returns how many sockets took it."""
    done = 0
    for fd in fds:
        sock = _socket_copy(fd)
        if sock is None:
            continue
        with sock:
            try:
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(timeout_s * 1000))
                )
            except OSError:
                continue
        done += 1
    return done


def _socket_copy(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of ``fd``, or None if ``fd`` is closed or not a socket.

    ``socket.socket(fileno=...)`` does not close the descriptor it refuses, so the duplicate is
    closed here: otherwise every pass over the process's files would leak one per non-socket.
    """
    try:
        copy = os.dup(fd)
    except OSError:  # closed meanwhile
        return None
    try:
        return socket.socket(fileno=copy)
    except OSError:  # not a socket
        os.close(copy)
        return None
