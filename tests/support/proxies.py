"""Real proxies for tests: tinyproxy (HTTP CONNECT, Basic auth), microsocks (SOCKS5, auth) and
Dante (SOCKS4, no auth, as SOCKS4 has none)."""

from __future__ import annotations

from pathlib import Path

from tests.support.net import free_port, wait_port
from tests.support.processes import ManagedProcess

DANTED = "/usr/sbin/danted"


class Tinyproxy:
    """``extra`` adds configuration lines (``ConnectPort 443``: CONNECT elsewhere gets 403)."""

    def __init__(self, folder: Path, user: str, password: str, extra: tuple[str, ...] = ()) -> None:
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
                    *extra,
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


class DanteSocks4:
    """Dante's SOCKS server speaking SOCKS4 only; its log names every connection it makes."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        config = folder / f"danted-{self.port}.conf"
        config.write_text(
            "\n".join(
                [
                    "logoutput: stderr",
                    f"internal: 127.0.0.1 port = {self.port}",
                    "external: 127.0.0.1",
                    "clientmethod: none",
                    "socksmethod: none",
                    "user.privileged: root",
                    "user.unprivileged: nobody",
                    "client pass {",
                    "  from: 127.0.0.0/8 to: 0.0.0.0/0",
                    "}",
                    "socks pass {",
                    "  from: 127.0.0.0/8 to: 127.0.0.0/8",
                    "  command: connect",
                    "  proxyprotocol: socks_v4",
                    "  log: connect",
                    "}",
                ]
            )
            + "\n"
        )
        self.process = ManagedProcess(
            [DANTED, "-f", str(config), "-N", "1"], folder / f"danted-{self.port}.log"
        )
        wait_port("127.0.0.1", self.port)

    def url(self) -> str:
        return f"socks4://127.0.0.1:{self.port}"

    def connected_to(self, host: str, port: int) -> bool:
        """Whether the log shows a connection relayed to ``host:port``."""
        return any(
            "tcp/connect [" in line and f" {host}.{port} " in f"{line} "
            for line in self.process.output().splitlines()
        )

    def stop(self) -> None:
        """danted is a group (monitor, negotiate, request and io children): all are told."""
        self.process.stop(whole_group=True)
