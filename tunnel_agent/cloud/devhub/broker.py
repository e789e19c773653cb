"""The mosquitto behind the front door: one broker for every device, on a private unix socket.

No device reaches it directly (see front_door.py): the only listener is a unix socket in a folder
only the hub's user can open, so nothing on the machine bypasses authentication. Sessions are
persisted, as IoT Hub keeps them, so subscriptions survive a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
INSTALL_HINT = "mosquitto is not installed (Debian/Ubuntu: sudo apt-get install mosquitto)"


class BrokerError(Exception):
    """mosquitto could not be started; the message says why in one line."""


@dataclass(frozen=True)
class BrokerSpec:
    """The broker's folder (config, log, persisted sessions) and its unix socket."""

    folder: Path
    socket_path: Path


def render_config(spec: BrokerSpec, user: str) -> str:
    """mosquitto.conf: a unix socket only, sessions persisted like IoT Hub's."""
    data = spec.folder / "data"
    lines = [
        f"user {user}",
        "persistence true",
        f"persistence_location {data}/",
        "autosave_interval 5",
        f"log_dest file {spec.folder / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "max_packet_size 270000",
        "max_queued_messages 1000",
        f"listener 0 {spec.socket_path}",
        # Only the front door and the hub's own session can open the socket: they authenticate.
        "allow_anonymous true",
    ]
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    def __init__(self, spec: BrokerSpec) -> None:
        self.spec = spec
        self._process: asyncio.subprocess.Process | None = None

    @property
    def config_file(self) -> Path:
        return self.spec.folder / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.spec.folder / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError(INSTALL_HINT)
        self.spec.folder.mkdir(parents=True, exist_ok=True)
        (self.spec.folder / "data").mkdir(exist_ok=True)
        self.spec.socket_path.unlink(missing_ok=True)
        self.config_file.write_text(render_config(self.spec, getpass.getuser()))
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(self.config_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await self._wait_listening(log_start)
        except BrokerError as exc:
            stderr = await self._stop_and_read_stderr()
            raise BrokerError(f"{exc}{self._explain(stderr, log_start)}") from None

    def _log_since(self, offset: int) -> str:
        if not self.log_file.exists():
            return ""
        with self.log_file.open(errors="replace") as handle:
            handle.seek(offset)
            return handle.read()

    async def _wait_listening(self, log_start: int) -> None:
        """Ready once mosquitto says it is running (all listeners open) and the port answers.

        The log line matters: a port that answers may belong to someone else.
        """
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while True:
            process = self._process
            if process is None or process.returncode is not None:
                raise BrokerError(f"mosquitto exited while starting on {self.address}")
            if " running" not in self._log_since(log_start):
                if asyncio.get_running_loop().time() > deadline:
                    raise BrokerError(f"mosquitto did not start on {self.address}")
                await asyncio.sleep(0.05)
                continue
            try:
                _, writer = await asyncio.open_unix_connection(str(self.spec.socket_path))
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise BrokerError(f"mosquitto did not listen on {self.address}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    @property
    def address(self) -> str:
        return str(self.spec.socket_path)

    def _explain(self, stderr: str, log_start: int) -> str:
        text = stderr + self._log_since(log_start)
        if "Address already in use" in text:
            return f": {self.address} is already in use"
        errors = [line.split(": ", 1)[-1] for line in text.splitlines() if "Error" in line]
        return f": {errors[-1]}" if errors else ""

    async def _stop_and_read_stderr(self) -> str:
        process = self._process
        if process is None:
            return ""
        if process.returncode is None:
            process.kill()
        _, stderr = await process.communicate()
        self._process = None
        return stderr.decode(errors="replace") if stderr else ""

    async def stop(self) -> None:
        """SIGTERM (mosquitto saves its sessions), SIGKILL if it lingers."""
        process = self._process
        self._process = None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.communicate()
        except TimeoutError:
            process.kill()
            await process.communicate()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


def find_mosquitto() -> str | None:
    """mosquitto lives in /usr/sbin on Debian, which is not on every user's PATH."""
    return shutil.which("mosquitto") or _sbin("mosquitto")


def _sbin(name: str) -> str | None:
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None
