"""Picking free TCP ports for servers that bind later (the demo, the tests).

Binding port 0 gives a port from the kernel's ephemeral range, the range outgoing connections
take their local ports from: a server that binds its picked port only after other components
have connected somewhere can find it taken ("address already in use"). Ports picked here lie
outside that range.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED_PORT = 10000


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (Linux's default when unreadable)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def pick_free_ports(count: int, host: str, avoid: Collection[int] = ()) -> list[int]:
    """``count`` distinct ports free on ``host`` now, outside the ephemeral range and ``avoid``.

    Each stays bound until all are picked, so no port is picked twice.
    """
    ephemeral = ephemeral_ports()
    candidates = [
        port
        for port in range(LOWEST_PICKED_PORT, 65536)
        if port not in ephemeral and port not in avoid
    ]
    random.shuffle(candidates)
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for port in candidates:
            if len(ports) == count:
                break
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sockets.append(sock)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    if len(ports) < count:
        raise OSError(f"fewer than {count} free ports on {host} outside the ephemeral range")
    return ports
