"""A machine without working DNS, for one agent: a name server that never answers.

The agent runs in its own mount namespace with ``/etc/resolv.conf`` replaced by one naming a
loopback address where a UDP socket takes queries and drops them, as a dead or firewalled DNS
server would (every lookup that reaches DNS then hangs until the resolver gives up).
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.net import fresh_loopback_ip
from tests.support.processes import in_private_mounts

DNS_PORT = 53


class SilentDns:
    def __init__(self, folder: Path) -> None:
        self.host = fresh_loopback_ip()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((self.host, DNS_PORT))
        folder.mkdir(parents=True, exist_ok=True)
        self.resolv_conf = folder / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {self.host}\noptions timeout:5 attempts:2\n")

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run with this server as its only name server."""
        return in_private_mounts('mount --bind "$0" /etc/resolv.conf', self.resolv_conf, command)

    def close(self) -> None:
        self._socket.close()
