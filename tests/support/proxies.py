"""Real proxies for tests: tinyproxy (HTTP CONNECT, Basic auth) and microsocks (SOCKS5, auth)."""

from __future__ import annotations

from pathlib import Path

from tests.support.net import free_port, wait_port
from tests.support.processes import ManagedProcess


class Tinyproxy:
    def __init__(self, folder: Path, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.port = free_port()
        config = folder / f"tinyproxy-{self.port}.conf"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "Listen 127.0.0.1",
                    "Timeout 120",
                    "Allow 127.0.0.1",
                    f"BasicAuth {user} {password}",
                    "LogLevel Connect",
                    "MaxClients 200",
                    "DisableViaHeader Yes",
                ]
            )
            + "\n"
        )
        self.process = ManagedProcess(
            ["tinyproxy", "-d", "-c", str(config)], folder / f"tinyproxy-{self.port}.log"
        )
        wait_port("127.0.0.1", self.port)

    def url(self, user: str | None = None, password: str | None = None) -> str:
        return f"http://{user or self.user}:{password or self.password}@127.0.0.1:{self.port}"

    def connects(self) -> int:
        return self.process.output().count("Request (file descriptor")

    def stop(self) -> None:
        self.process.stop()


class Microsocks:
    def __init__(self, folder: Path, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.port = free_port()
        self.process = ManagedProcess(
            ["microsocks", "-i", "127.0.0.1", "-p", str(self.port), "-u", user, "-P", password],
            folder / f"microsocks-{self.port}.log",
        )
        wait_port("127.0.0.1", self.port)

    def url(
        self, scheme: str = "socks5h", user: str | None = None, password: str | None = None
    ) -> str:
        return f"{scheme}://{user or self.user}:{password or self.password}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()
