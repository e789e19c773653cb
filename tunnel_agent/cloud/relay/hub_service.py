"""Direct methods through IoT Hub's service REST API, as the relay (or any backend) calls them.

``POST https://<hub>/twins/<deviceId>/methods?api-version=2021-04-12`` with ``methodName``,
``payload`` and ``responseTimeoutInSeconds``, authorised by a SAS made from a service policy key.
The same code talks to a real IoT Hub or to ``tunnel-agent devhub``.
"""

from __future__ import annotations

import asyncio.sslproto
import contextlib
import json
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from tunnel_agent.cloud.sas import generate_sas
from tunnel_agent.hub.connection_string import SERVICE_REQUIRED, parse_connection_string

API_VERSION = "2021-04-12"
SAS_LIFETIME_S = 3600
CONNECT_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 5
PROBE_PATH = "/statistics/service"  # IoT Hub's service statistics: cheap, authenticated
# Connections to the REST API kept open between calls. Each TLS connection holds about 256 KiB
# (asyncio's TLS buffer), so a burst of tunnelOpen calls must not leave one behind per call: calls
# beyond these go out on a connection of their own, closed with its answer, so that a few slow
# devices never make the others wait for a kept connection.
KEPT_CONNECTIONS = 4
# asyncio's TLS protocol reads into a zero-filled buffer of ``SSLProtocol.max_size`` (256 KiB)
# per connection, all of it touched at once. The relay's only asyncio TLS connections are these
# (its own ports use aiofastnet), their answers are a few hundred bytes, and a burst of opens
# makes one per call: at 256 KiB each the burst stayed in the heap after the calls were done.
HUB_TLS_READ_BYTES = 32 * 1024
_REFUSED_CREDENTIALS = (401, 403)
_SERVER_ERROR = 500


class MethodCallFailed(Exception):
    """The hub could not deliver the call; ``status`` is the hub's HTTP status (0: not reached)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class MethodAnswer:
    """The device's answer: its status and JSON payload."""

    status: int
    payload: Any


class HubServiceClient:
    def __init__(
        self,
        service_connection_string: str,
        rest_url: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        fields = parse_connection_string(service_connection_string, SERVICE_REQUIRED)
        self.hostname = fields["HostName"]
        self._policy = fields["SharedAccessKeyName"]
        self._key = fields["SharedAccessKey"]
        self.rest_url = (rest_url or f"https://{self.hostname}").rstrip("/")
        self._ssl = ssl.create_default_context()
        if ca_file is not None:
            self._ssl.load_verify_locations(cafile=str(ca_file))
        self._session: aiohttp.ClientSession | None = None
        self._one_shot: aiohttp.ClientSession | None = None
        self._kept_in_use = 0
        self._sas: tuple[str, float] | None = None
        self.reachable: bool | None = None  # None until the first exchange
        self.unreachable_reason = "not checked yet"
        self.errors: Counter[str] = Counter()  # by kind, for the metrics

    async def close(self) -> None:
        for session in (self._session, self._one_shot):
            if session is not None:
                await session.close()
        self._session = self._one_shot = None

    def _authorization(self) -> str:
        now = time.time()
        if self._sas is None or self._sas[1] - now < SAS_LIFETIME_S / 2:
            expiry = int(now + SAS_LIFETIME_S)
            self._sas = (generate_sas(self.hostname, self._key, self._policy, expiry), expiry)
        return self._sas[0]

    @contextlib.contextmanager
    def _client(self) -> Iterator[aiohttp.ClientSession]:
        """A kept connection while one is free, else a connection for this call alone."""
        if self._kept_in_use >= KEPT_CONNECTIONS:
            if self._one_shot is None:
                connector = aiohttp.TCPConnector(ssl=self._ssl, limit=0, force_close=True)
                self._one_shot = aiohttp.ClientSession(connector=connector)
            yield self._one_shot
            return
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=KEPT_CONNECTIONS)
            self._session = aiohttp.ClientSession(connector=connector)
        self._kept_in_use += 1
        try:
            yield self._session
        finally:
            self._kept_in_use -= 1

    def _heard(self, status: int) -> None:
        """Any HTTP answer but refused credentials or a server error means the API is there."""
        if status in _REFUSED_CREDENTIALS:
            self.reachable = False
            self.unreachable_reason = f"hub refused the credentials ({status})"
        elif status >= _SERVER_ERROR:
            self.reachable, self.unreachable_reason = False, f"hub answered {status}"
        else:
            self.reachable, self.unreachable_reason = True, ""

    def _lost(self, exc: BaseException) -> None:
        self.errors["unreachable"] += 1
        self.reachable, self.unreachable_reason = False, f"hub not reached ({type(exc).__name__})"

    async def probe(self) -> bool:
        """One cheap authenticated request: is the hub's REST API reachable with our key?"""
        url = f"{self.rest_url}{PROBE_PATH}?api-version={API_VERSION}"
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            with self._client() as session:
                async with session.get(
                    url, headers={"Authorization": self._authorization()}, timeout=timeout
                ) as response:
                    await response.read()
                    self._heard(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._lost(exc)
        return bool(self.reachable)

    async def invoke(
        self, device_id: str, method: str, payload: Any, response_timeout_s: int
    ) -> MethodAnswer:
        url = f"{self.rest_url}/twins/{quote(device_id, safe='')}/methods?api-version={API_VERSION}"
        body = {
            "methodName": method,
            "payload": payload,
            "responseTimeoutInSeconds": response_timeout_s,
            "connectTimeoutInSeconds": 0,
        }
        timeout = aiohttp.ClientTimeout(
            total=response_timeout_s + CONNECT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S
        )
        try:
            with self._client() as session:
                async with session.post(
                    url,
                    json=body,
                    headers={"Authorization": self._authorization()},
                    timeout=timeout,
                ) as response:
                    text = await response.text()
                    self._heard(response.status)
                    if response.status != 200:
                        self.errors[f"http_{response.status}"] += 1
                        raise MethodCallFailed(response.status, _hub_reason(text, response.reason))
                    answer = json.loads(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._lost(exc)
            raise MethodCallFailed(0, type(exc).__name__) from None
        except ValueError:
            self.errors["bad_answer"] += 1
            raise MethodCallFailed(0, "answer is not JSON") from None
        return MethodAnswer(int(answer.get("status", 0)), answer.get("payload"))


def limit_tls_read_buffer() -> None:
    """Make asyncio's TLS read buffer (process-wide) the size the hub's answers need."""
    asyncio.sslproto.SSLProtocol.max_size = HUB_TLS_READ_BYTES


def _hub_reason(text: str, fallback: str | None) -> str:
    """IoT Hub errors carry ``Message`` (sometimes JSON inside JSON); keep a short reason."""
    try:
        document = json.loads(text)
    except ValueError:
        return fallback or "error"
    message = (
        document.get("Message") or document.get("message") if isinstance(document, dict) else None
    )
    if isinstance(message, str):
        try:
            inner = json.loads(message)
            if isinstance(inner, dict) and isinstance(inner.get("errorCode"), int | str):
                return f"{inner.get('errorCode')}: {inner.get('message', '')}".strip()
        except ValueError:
            pass
        return message[:200]
    return fallback or "error"
