"""Loopback addresses and ports for tests (never anything but 127.0.0.0/8)."""

from __future__ import annotations

import itertools
import os
import socket
import time

# Each test session takes its own block of 127.x.y.z so that two runs on one machine do not
# fight over port 8883, which the IoT SDK cannot be told to avoid.
_BASE = 10 + (os.getpid() % 200)
_hosts = itertools.count(2)


def fresh_loopback_ip() -> str:
    """A loopback address not used before in this session, for a listener on a fixed port."""
    n = next(_hosts)
    return f"127.{_BASE}.{(n // 250) % 250}.{n % 250 + 2}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: each stays bound until all are picked (``free_port`` called
    in a row can hand out the same port twice)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
