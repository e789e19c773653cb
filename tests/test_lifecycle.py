"""Nothing leaks: after many open/close cycles, descriptors and tasks are back to the baseline."""

from __future__ import annotations

import asyncio
import gc
import os

from aiohttp import web

from tests.support.inprocess import open_via, service_for
from tests.support.tcp_camera import TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.support.ws_endpoint import Session, TunnelEndpoint, echo_handler
from tunnel_agent.cloud.devhub.certs import LocalCA

CYCLES = 200


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def steady_fds() -> int:
    """The descriptor count once sockets that are still closing have gone."""
    samples = [open_fds()]
    while len(samples) < 3 or len(set(samples[-3:])) > 1:
        await asyncio.sleep(0.1)
        samples.append(open_fds())
    return samples[-1]


async def close_after_greeting(ws: web.WebSocketResponse, session: Session) -> None:
    await ws.send_bytes(b"hello camera")
    async for message in ws:
        if isinstance(message.data, bytes):
            await ws.close(code=1000)


async def test_open_close_cycles_return_fds_and_tasks_to_baseline(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    service = service_for(ca, stub.port)
    # One warm-up cycle so lazily created objects (SSL contexts, loggers) exist in the baseline.
    warm = await open_via(
        service, endpoint, await servers.call(endpoint.new_session(handler=echo_handler)), stub.port
    )
    warm.close("warm-up")
    await warm.closed
    await until(lambda: all(c.closed.is_set() for c in stub.connections))
    gc.collect()
    fds, tasks = await steady_fds(), len(asyncio.all_tasks())

    for cycle in range(CYCLES):
        handler = close_after_greeting if cycle % 3 == 0 else echo_handler
        session = await servers.call(endpoint.new_session(handler=handler))
        tunnel = await open_via(service, endpoint, session, stub.port)
        await until(lambda n=cycle + 2: len(stub.connections) >= n)
        connection = stub.connections[-1]
        connection.writer.write(b"camera says hi")
        if cycle % 3 == 1:
            await until(lambda t=tunnel: t.bytes_to_remote > 0)
            connection.writer.close()  # the camera ends it
        elif cycle % 3 == 2:
            await until(lambda t=tunnel: t.bytes_to_camera > 0)
            tunnel.close("agent ends it")
        await asyncio.wait_for(asyncio.shield(tunnel.closed), 5)
        await asyncio.wait_for(connection.closed.wait(), 5)

    assert service.registry.open_tunnels == []
    await until(lambda: open_fds() <= fds, timeout_s=10)
    gc.collect()
    assert await steady_fds() <= fds  # 200 leaked sockets would be hundreds more
    assert len(asyncio.all_tasks()) == tasks
