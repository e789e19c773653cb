"""Nothing leaks: after many open/close cycles, descriptors and tasks are back to the baseline."""

from __future__ import annotations

import asyncio
import contextlib
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
TCP_LISTEN = "0A"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def socket_inodes() -> set[int]:
    """The inodes of the sockets this process holds a descriptor for."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listed_sockets(ports: set[int]) -> tuple[set[int], set[int]]:
    """Inodes of every socket the kernel lists, and of the TCP connections on one of ``ports``."""
    listed: set[int] = set()
    on_ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{table}") as rows:
            next(rows)
            for fields in (row.split() for row in rows):
                inode = int(fields[9])
                listed.add(inode)
                ends = {int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)}
                if fields[3] != TCP_LISTEN and ends & ports:
                    on_ports.add(inode)
    for table in ("udp", "udp6", "raw", "raw6", "netlink", "unix"):
        column = 6 if table == "unix" else 9
        with open(f"/proc/self/net/{table}") as rows:
            next(rows)
            listed.update(int(row.split()[column]) for row in rows)
    return listed, on_ports


def sockets_still_closing(ports: set[int], before: set[int]) -> set[int]:
    """Sockets opened since ``before`` that are connections on ``ports`` or already ended.

    The kernel stops listing a TCP socket once its connection has ended (closed or reset), while
    the descriptor stays open until the event loop releases it: those count as still closing.
    """
    held = socket_inodes() - before
    listed, on_ports = listed_sockets(ports)
    return {inode for inode in held if inode in on_ports or inode not in listed}


async def tunnel_sockets_closed(ports: set[int], before: set[int]) -> None:
    """Wait until every socket the tunnels opened has released its descriptor.

    A positive event rather than a quiet period: the count cannot settle early on a socket that
    is still closing, and a socket that never closes fails on the deadline instead of hanging.
    """
    await until(lambda: not sockets_still_closing(ports, before), timeout_s=20)


async def close_after_greeting(ws: web.WebSocketResponse, session: Session) -> None:
    await ws.send_bytes(b"hello camera")
    async for message in ws:
        if isinstance(message.data, bytes):
            await ws.close(code=1000)


async def test_open_close_cycles_return_fds_and_tasks_to_baseline(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    service = service_for(ca, stub.port)
    ports = {stub.port, *endpoint.ports.values()}
    before = socket_inodes()
    # One warm-up cycle so lazily created objects (SSL contexts, loggers) exist in the baseline.
    warm = await open_via(
        service, endpoint, await servers.call(endpoint.new_session(handler=echo_handler)), stub.port
    )
    warm.close("warm-up")
    await warm.closed
    await until(lambda: all(c.closed.is_set() for c in stub.connections))
    await tunnel_sockets_closed(ports, before)
    gc.collect()
    fds, tasks = open_fds(), len(asyncio.all_tasks())

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
    await tunnel_sockets_closed(ports, before)
    gc.collect()
    assert open_fds() <= fds  # 200 leaked sockets would be hundreds more
    assert len(asyncio.all_tasks()) == tasks
