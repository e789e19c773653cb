"""Loopback addresses and ports for tests (never anything but 127.0.0.0/8)."""

from __future__ import annotations

import itertools
import os
import socket
import time

from tunnel_agent.ports import pick_free_ports

# Each test session takes its own block of 127.x.y.z so that two runs on one machine do not
# fight over port 8883, which the IoT SDK cannot be told to avoid.
_BASE = 10 + (os.getpid() % 200)
_hosts = itertools.count(2)


def fresh_loopback_ip() -> str:
    """A loopback address not used before in this session, for a listener on a fixed port.

    The block is chosen by pid, so another run (or a bench) whose pid falls on the same block
    can hold the address already: addresses with a socket bound to them are skipped."""
    while True:
        n = next(_hosts)
        host = f"127.{_BASE}.{(n // 250) % 250}.{n % 250 + 2}"
        if not address_in_use(host):
            return host


def address_in_use(host: str) -> bool:
    """Whether any TCP or UDP socket of this network namespace is bound to ``host``."""
    hex_address = socket.inet_aton(host)[::-1].hex().upper()  # as /proc/net prints it
    for table in ("tcp", "udp"):
        with open(f"/proc/net/{table}") as rows:
            next(rows)
            if any(row.split()[1].startswith(hex_address + ":") for row in rows):
                return True
    return False


# Every port handed out in this session, never handed out again: a port picked and let go is
# free for the kernel to give out once more, so two picks made one after the other (or one made
# while an earlier pick is not yet bound by the server it was for) could otherwise be the same.
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports outside the kernel's ephemeral range (a port picked there and
    bound a moment later can meanwhile become the source port of an outgoing connection), none
    handed out before in this session (see ``tunnel_agent.ports``)."""
    ports = pick_free_ports(count, host, avoid=_handed_out)
    _handed_out.update(ports)
    return ports


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
