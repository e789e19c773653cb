"""A camera's HTTP snapshot URL (JPEG over HTTP) as a source for snapshot tasks.

Polled at the highest rate its tasks ask for, each request bounded by a timeout, with Basic or
Digest authentication (whichever the camera asks for, once it asks). Images go to the tasks as
they are; a task that wants another format re-encodes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tunnel_agent.logs import redact_text
from tunnel_agent.media.settings import MediaSettings
from tunnel_agent.media.source import SourceBase, SourceState
from tunnel_agent.media.tasks.base import FrameTask
from tunnel_agent.media.urls import SourceAddress, without_credentials

MAX_POLL_PER_S = 10.0
MAX_IMAGE_BYTES = 32 * 1024 * 1024
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_format(data: bytes, content_type: str | None) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if content_type and content_type.startswith("image/"):
        subtype = content_type.split("/", 1)[1].split(";", 1)[0].strip()
        return {"jpg": "jpeg", "tif": "tiff"}.get(subtype, subtype)
    return None


class HttpSnapshotSource(SourceBase):
    def __init__(
        self,
        camera: str,
        address: SourceAddress,
        settings: MediaSettings,
        frame_tasks: list[FrameTask],
    ) -> None:
        super().__init__(camera, address, settings, frame_tasks)
        self.url = without_credentials(address.open_url)
        self.username, self.password = address.username, address.password
        self._task: asyncio.Task[None] | None = None

    @property
    def poll_interval_s(self) -> float:
        rates = [t.rate_per_s for t in self.frame_tasks]
        fastest = MAX_POLL_PER_S if any(r <= 0 for r in rates) else max(rates, default=1.0)
        return 1.0 / min(fastest, MAX_POLL_PER_S)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop_async(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = SourceState.STOPPED

    def check_watchdog(self, now: float) -> bool:
        return False  # every request has its own deadline

    async def run(self) -> None:
        async with HttpImageFetcher(
            self.url, self.username, self.password, self.settings.open_timeout
        ) as fetcher:
            while True:
                try:
                    await self._poll(fetcher)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    delay = self._backoff.next_delay()
                    self.counters["failures"] += 1
                    self._set_state(
                        SourceState.BACKING_OFF,
                        redact_text(f"{type(exc).__name__}: {exc}"),
                        retry_in_s=round(delay, 1),
                    )
                    await asyncio.sleep(delay)

    async def _poll(self, fetcher: HttpImageFetcher) -> None:
        started = time.monotonic()
        while True:
            tick = time.monotonic()
            data, image_format = await fetcher.fetch()
            now = time.monotonic()
            self.last_packet_at = now
            self.counters["images"] += 1
            if self.state is not SourceState.RUNNING:
                self._set_state(SourceState.RUNNING, format=image_format)
            self._backoff.ran_for(now - started)
            self._deliver(None, data, image_format)
            await asyncio.sleep(max(0.0, self.poll_interval_s - (time.monotonic() - tick)))


class HttpImageFetcher:
    """GETs an image URL with a deadline, answering the camera's Basic or Digest challenge.

    Credentials are sent only once the camera has asked, in the scheme it asked for (Digest when
    it offers both): a Digest camera never sees the password in clear. The scheme is then kept.
    """

    def __init__(
        self, url: str, username: str | None, password: str | None, timeout_s: float
    ) -> None:
        self.url = without_credentials(url)
        self.username, self.password = username, password
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._scheme: str | None = None  # "basic" or "digest" once the camera has asked
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpImageFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _open_session(self) -> aiohttp.ClientSession:
        middlewares: tuple[Any, ...] = ()
        auth = None
        if self.username is not None and self._scheme == "digest":
            middlewares = (aiohttp.DigestAuthMiddleware(self.username, self.password or ""),)
        elif self.username is not None and self._scheme == "basic":
            auth = aiohttp.BasicAuth(self.username, self.password or "")
        return aiohttp.ClientSession(timeout=self.timeout, auth=auth, middlewares=middlewares)

    async def fetch(self) -> tuple[bytes, str]:
        """(image bytes, format); ValueError for anything that is not an image."""
        for _ in range(2):
            if self._session is None:
                self._session = self._open_session()
            async with self._session.get(self.url) as response:
                if response.status == 401 and self._scheme is None and self.username is not None:
                    self._scheme = _asked_scheme(response.headers.getall("WWW-Authenticate", []))
                    if self._scheme is not None:
                        await self._session.close()
                        self._session = None
                        continue
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                data = await _read_body(response, MAX_IMAGE_BYTES)
                content_type = response.headers.get("Content-Type")
            image_format = sniff_format(data, content_type)
            if image_format is None:
                raise ValueError("the URL did not return an image")
            return data, image_format
        raise ValueError("HTTP 401")


def _asked_scheme(challenges: list[str]) -> str | None:
    """The scheme to answer a 401 with: Digest if offered, else Basic, else none we speak."""
    offered = {challenge.split(" ", 1)[0].strip().lower() for challenge in challenges}
    return next((scheme for scheme in ("digest", "basic") if scheme in offered), None)


async def _read_body(response: aiohttp.ClientResponse, limit_bytes: int) -> bytes:
    """The whole body (``content.read(n)`` may return less), refusing more than the limit."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit_bytes:
            raise ValueError(f"image larger than {limit_bytes // 2**20} MiB")
    return bytes(body)
