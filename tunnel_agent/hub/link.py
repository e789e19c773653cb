"""Keep the device connected to IoT Hub and answer direct methods without blocking the SDK.

The SDK retries a dropped connection by itself at a fixed interval but is known to give up after
some outages and network changes, and its calls can hang while disconnected. So: every SDK call here
has a deadline; the first connection is retried with exponential backoff and jitter; and a link that
stays down longer than ``reconnect_after`` is torn down and built again, with the same backoff.

The SDK calls method handlers from its own threads. The handler here only hands the request to our
event loop (``call_soon_threadsafe``) and returns at once; the answer is sent from our loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from tunnel_agent.aio import in_daemon_thread, wait_any
from tunnel_agent.config.proxy import ProxyAddress
from tunnel_agent.config.settings import HubSettings
from tunnel_agent.hub.device_client import DeviceIdentity, create_device_client
from tunnel_agent.hub.sdk import IoTHubDeviceClient, MethodRequest, MethodResponse
from tunnel_agent.logs import EventLogger
from tunnel_agent.tunnel.service import MethodResult

MethodHandler = Callable[[str, object], Awaitable[MethodResult]]
# Desired properties: the whole desired document after (re)connecting, then each patch.
DesiredHandler = Callable[[dict[str, Any], bool], Coroutine[Any, Any, None]]
STATE_POLL_S = 1.0


class HubLink:
    """The supervised device connection. ``run`` returns when ``stop`` is set."""

    def __init__(
        self,
        settings: HubSettings,
        proxy: ProxyAddress | None,
        handler: MethodHandler,
        *,
        backoff_initial_s: float = 1.0,
        desired_handler: DesiredHandler | None = None,
    ) -> None:
        self.settings = settings
        self.desired_handler = desired_handler
        self.proxy = proxy
        self.handler = handler
        self.backoff_initial_s = backoff_initial_s
        self.log = EventLogger("tunnel_agent.hub")
        self.connected = False
        self._connections = 0
        self.identity: DeviceIdentity | None = None
        self._client: IoTHubDeviceClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._state_changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(self._on_loop_exception)
        while not stop.is_set():
            client = await self._connect_with_backoff(stop)
            if client is None:
                return
            try:
                await self._watch(client, stop)
            finally:
                await self._shutdown(client)

    async def finish_answers(self, timeout_s: float) -> None:
        """Let in-flight method answers go out before the client shuts down."""
        if self._answering:
            await asyncio.wait(set(self._answering), timeout=timeout_s)

    # -- connecting ---------------------------------------------------------------------------

    async def _connect_with_backoff(self, stop: asyncio.Event) -> IoTHubDeviceClient | None:
        async def sleep_unless_stopped(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.log.warning(
                "hub.connect_failed",
                attempt=state.attempt_number,
                error=_describe(error),
                retry_in_s=round(wait, 1),
            )

        retrying = AsyncRetrying(
            wait=wait_random_exponential(
                multiplier=self.backoff_initial_s, max=self.settings.backoff_max
            ),
            retry=retry_if_exception_type(Exception),
            stop=lambda _: stop.is_set(),
            sleep=sleep_unless_stopped,
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if stop.is_set():
                        return None
                    return await self._connect_once()
        except Exception:
            return None  # stopped while failing
        return None

    async def _connect_once(self) -> IoTHubDeviceClient:
        timeout = self.settings.operation_timeout
        self.log.info(
            "hub.connecting",
            auth=self._auth_kind(),
            proxy=self.proxy.display if self.proxy else None,
        )
        async with asyncio.timeout(timeout):
            client, identity = await create_device_client(self.settings, self.proxy)
        try:
            async with asyncio.timeout(timeout):
                await client.connect()
            # The setters block while the SDK subscribes: keep them off our loop.
            async with asyncio.timeout(timeout):
                await in_daemon_thread(lambda: self._set_handlers(client), "hub-handlers")
        except BaseException:
            await self._shutdown(client)
            raise
        self.identity = identity
        self._client = client
        self._set_connected(True, client)
        if self.desired_handler is not None:
            self._spawn(self._sync_desired(client))
        return client

    def _set_handlers(self, client: IoTHubDeviceClient) -> None:
        setattr(client, "on_connection_state_change", self._on_state_change)  # noqa: B010
        setattr(client, "on_method_request_received", self._on_method_request)  # noqa: B010
        if self.desired_handler is not None:
            setattr(  # noqa: B010
                client, "on_twin_desired_properties_patch_received", self._on_desired_patch
            )

    async def _sync_desired(self, client: IoTHubDeviceClient) -> None:
        """Patches may have been missed while offline: start from the whole desired document."""
        try:
            async with asyncio.timeout(self.settings.operation_timeout):
                twin = await client.get_twin()
        except Exception as exc:
            self.log.warning("hub.twin_read_failed", error=_describe(exc))
            return
        desired = twin.get("desired") if isinstance(twin, dict) else None
        if isinstance(desired, dict) and self.desired_handler is not None:
            await self.desired_handler(desired, True)

    async def report(self, patch: dict[str, Any]) -> bool:
        """Send reported properties; False if the link is down or the hub did not confirm."""
        client = self._client
        if client is None or not self.connected:
            return False
        try:
            async with asyncio.timeout(self.settings.operation_timeout):
                await client.patch_twin_reported_properties(patch)
        except Exception as exc:
            self.log.warning("hub.twin_report_failed", error=_describe(exc))
            return False
        return True

    def _auth_kind(self) -> str:
        if self.settings.connection_string is not None:
            return "connection_string"
        return "dps" if self.settings.id_scope is not None else "x509"

    # -- watching -----------------------------------------------------------------------------

    async def _watch(self, client: IoTHubDeviceClient, stop: asyncio.Event) -> None:
        """Log state changes; return when stopping or when the link needs rebuilding."""
        down_since: float | None = None
        while not stop.is_set():
            self._state_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait_any(stop, self._state_changed), STATE_POLL_S)
            connected = bool(client.connected)
            if connected != self.connected:
                self._set_connected(connected, client)
            if connected:
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > self.settings.reconnect_after:
                self.log.warning("hub.rebuilding_client", down_s=round(now - down_since, 1))
                return

    def _set_connected(self, connected: bool, client: IoTHubDeviceClient) -> None:
        if connected and not self.connected:
            self._connections += 1
            identity = self.identity
            self.log.info(
                "hub.connected",
                host=identity.hostname if identity else None,
                device=identity.device_id if identity else None,
                reconnects=self.reconnects,
            )
        elif not connected and self.connected:
            self.log.warning("hub.disconnected")
        self.connected = connected

    @property
    def reconnects(self) -> int:
        """Connections made after the first one (SDK reconnects and rebuilt clients)."""
        return max(0, self._connections - 1)

    async def _shutdown(self, client: IoTHubDeviceClient) -> None:
        if self._client is client:
            self._client = None
            if self.connected:
                self.log.info("hub.disconnecting")
            self.connected = False
        try:
            async with asyncio.timeout(self.settings.operation_timeout):
                await client.shutdown()
        except Exception as exc:
            self.log.warning("hub.shutdown_failed", error=_describe(exc))

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An SDK call given up at its deadline can still fail later, when nobody awaits it.

        asyncio would report that as an error with a traceback; it is expected (the link has
        already logged the timeout and moved on), so it becomes one warning line.
        """
        error = context.get("exception")
        if (
            context.get("message") == "Future exception was never retrieved"
            and error is not None
            and type(error).__module__.startswith("azure.iot.device")
        ):
            self.log.warning("hub.abandoned_call_failed", error=type(error).__name__)
            return
        loop.default_exception_handler(context)

    # -- SDK callbacks (SDK threads) ------------------------------------------------------------

    def _on_state_change(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._state_changed.set)

    def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        loop = self._loop
        handler = self.desired_handler
        if loop is not None and handler is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self._spawn(handler(patch, False)))

    def _on_method_request(self, request: MethodRequest) -> None:
        loop = self._loop
        client = self._client
        if loop is not None and client is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._start_answer, client, request)

    # -- answering (our loop) -----------------------------------------------------------------

    def _start_answer(self, client: IoTHubDeviceClient, request: MethodRequest) -> None:
        self.log.debug("hub.method_received", method=str(request.name)[:64])
        self._spawn(self._answer(client, request))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, client: IoTHubDeviceClient, request: MethodRequest) -> None:
        result = await self.handler(str(request.name), request.payload)
        response = MethodResponse.create_from_method_request(request, result.status, result.body)
        try:
            async with asyncio.timeout(self.settings.operation_timeout):
                await client.send_method_response(response)
        except Exception as exc:
            self.log.warning(
                "hub.method_response_failed",
                method=str(request.name)[:64],
                status=result.status,
                error=_describe(exc),
            )


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown"
    if isinstance(error, TimeoutError):
        return "timeout"
    cause = error.__cause__
    detail = f" ({type(cause).__name__})" if cause is not None else ""
    return f"{type(error).__name__}{detail}"
