"""The open tunnels: the cap on their number, repeated requests, and shutdown.

A repeated tunnelOpen for the same endpoint and token (the cloud retrying after a lost answer)
gets the tunnel that already exists or is being opened, never a second one. Keys are hashes, so
the registry holds no token. Each opening runs as a task of its own, so that shutdown can cancel
the ones still in progress (their sockets are closed, their requests answered 503).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from tunnel_agent.tunnel.camera_tunnel import Tunnel
from tunnel_agent.tunnel.errors import shutting_down, too_many_tunnels
from tunnel_agent.tunnel.request import TunnelRequest


def request_key(request: TunnelRequest) -> bytes:
    digest = hashlib.sha256()
    digest.update(request.endpoint.url.encode())
    digest.update(b"\0")
    digest.update(request.token.encode())
    return digest.digest()


class TunnelRegistry:
    def __init__(self, max_tunnels: int) -> None:
        self.max_tunnels = max_tunnels
        self._by_key: dict[bytes, asyncio.Future[Tunnel]] = {}
        self._open: dict[str, Tunnel] = {}
        self._opening: set[asyncio.Task[Tunnel]] = set()
        self._accepting = True

    @property
    def open_tunnels(self) -> list[Tunnel]:
        return list(self._open.values())

    def get(self, tunnel_id: str) -> Tunnel | None:
        return self._open.get(tunnel_id)

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def open(
        self, request: TunnelRequest, opener: Callable[[], Awaitable[Tunnel]]
    ) -> tuple[Tunnel, bool]:
        """The tunnel for ``request`` and whether it already existed."""
        if not self._accepting:
            raise shutting_down()
        key = request_key(request)
        pending = self._by_key.get(key)
        if pending is not None:
            tunnel = await asyncio.shield(pending)
            if tunnel.close_reason is None:
                return tunnel, True
        if len(self._by_key) >= self.max_tunnels:
            raise too_many_tunnels(self.max_tunnels)
        future: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume_exception)
        self._by_key[key] = future
        opening = asyncio.ensure_future(opener())
        self._opening.add(opening)
        try:
            tunnel = await opening
        except BaseException as exc:
            self._by_key.pop(key, None)
            if _cancelled_by_shutdown(opening):
                refused = shutting_down()
                future.set_exception(refused)
                raise refused from None
            if isinstance(exc, Exception):
                future.set_exception(exc)
            else:
                future.cancel()
            raise
        finally:
            self._opening.discard(opening)
        if not self._accepting:  # opened just as shutdown began: it goes with the others
            tunnel.go_away("agent shutdown")
        future.set_result(tunnel)
        self._open[tunnel.id] = tunnel
        tunnel.closed.add_done_callback(lambda _: self._forget(key, tunnel))
        return tunnel, False

    def _forget(self, key: bytes, tunnel: Tunnel) -> None:
        self._open.pop(tunnel.id, None)
        future = self._by_key.get(key)
        if (
            future is not None
            and future.done()
            and not future.cancelled()
            and future.exception() is None
            and future.result() is tunnel
        ):
            del self._by_key[key]

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def opening(self) -> int:
        return len(self._opening)

    async def close_all(self, reason: str, timeout_s: float) -> None:
        """Cancel the openings in progress, close every tunnel, and wait (bounded) until both
        ends of each are gone."""
        self.stop_accepting()
        deadline = asyncio.get_running_loop().time() + timeout_s
        opening = list(self._opening)
        for task in opening:
            task.cancel()
        if opening:
            await asyncio.wait(opening, timeout=timeout_s)
        tunnels = list(self._open.values())
        for tunnel in tunnels:
            tunnel.go_away(reason)
        remaining = deadline - asyncio.get_running_loop().time()
        if tunnels and remaining > 0:
            await asyncio.wait([t.closed for t in tunnels], timeout=remaining)


def _cancelled_by_shutdown(opening: asyncio.Task[Tunnel]) -> bool:
    """The opening was cancelled by ``close_all``, not because its caller was cancelled."""
    caller = asyncio.current_task()
    return opening.cancelled() and (caller is None or caller.cancelling() == 0)


def _consume_exception(future: asyncio.Future[Tunnel]) -> None:
    if not future.cancelled():
        future.exception()
