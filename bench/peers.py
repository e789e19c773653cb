"""The benchmark's peers, each run as its own process: ``python -m bench.peers sink|source ...``.

``sink`` is the "cloud": a picows WebSocket server (ws:// and, with a certificate, wss://) and a raw
TCP server, both counting the bytes they receive. It prints one JSON line with its ports, then
answers commands read from stdin, one JSON line each on stdout:

* ``stats`` -> ``{"bytes": total, "active": open connections, "accepted": n, "per_conn": [...]}``
* ``close`` -> closes every open connection (WebSocket CLOSE 1000 or TCP close), answers ``{}``
* ``connect HOST PORT N`` -> opens N TCP connections to HOST:PORT that count what they receive
  (a consumer of a relay), answers ``{"connected": n}`` once they are made

A WebSocket whose path starts with ``/close`` is closed 50 ms after it is accepted (for latency).

``source`` is the "camera": a TCP listener that writes ``--chunk`` bytes every ``--interval``
seconds to every accepted connection (all connections in one timer), or only holds connections
open with ``--chunk 0``. Neither peer is what is measured; both stay off the relay's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import threading
from typing import Any, cast

import picows
from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport, WSUpgradeRequest

LOOPBACK = "127.0.0.1"
CLOSE_DELAY_S = 0.05


class Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.open = True


class Stats:
    def __init__(self) -> None:
        self.counters: list[Counter] = []
        self.closers: dict[Counter, Any] = {}

    def add(self, closer: Any) -> Counter:
        counter = Counter()
        self.counters.append(counter)
        self.closers[counter] = closer
        return counter

    def gone(self, counter: Counter) -> None:
        counter.open = False
        self.closers.pop(counter, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "bytes": sum(c.bytes for c in self.counters),
            "active": len(self.closers),
            "accepted": len(self.counters),
            "per_conn": [c.bytes for c in self.counters if c.open],
        }

    def close_all(self) -> None:
        for closer in list(self.closers.values()):
            closer()


class SinkListener(picows.WSListener):
    def __init__(self, stats: Stats, close_at_once: bool) -> None:
        self.stats = stats
        self.close_at_once = close_at_once
        self.counter: Counter | None = None
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.counter = self.stats.add(self.close)
        if self.close_at_once:
            # Not at once: a CLOSE that arrives with the handshake answer is lost by the agent
            # (it handles the frame before its tunnel holds the WebSocket; see bench/README.md).
            asyncio.get_running_loop().call_later(CLOSE_DELAY_S, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self.transport.send_close(WSCloseCode.OK)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif self.counter is not None:
            self.counter.bytes += frame.payload_size

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.counter is not None:
            self.stats.gone(self.counter)


class TcpSink(asyncio.BufferedProtocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray(1 << 20)
        self.counter: Counter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.counter = self.stats.add(transport.close)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.counter is not None:
            self.counter.bytes += nbytes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counter is not None:
            self.stats.gone(self.counter)


async def run_sink(cert: str | None, key: str | None) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()

    def factory(request: WSUpgradeRequest) -> picows.WSListener:
        return SinkListener(stats, request.path.startswith(b"/close"))

    servers = [
        await picows.ws_create_server(factory, LOOPBACK, 0, max_frame_size=16 << 20),
        await loop.create_server(lambda: TcpSink(stats), LOOPBACK, 0),
    ]
    ports = {"ws": _port(servers[0]), "tcp": _port(servers[1])}
    if cert and key:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        servers.append(
            await picows.ws_create_server(factory, LOOPBACK, 0, ssl=tls, max_frame_size=16 << 20)
        )
        ports["wss"] = _port(servers[-1])
    print(json.dumps(ports), flush=True)

    pending: set[asyncio.Task[None]] = set()

    async def connect(host: str, port: int, count: int) -> None:
        made = 0
        for _ in range(count):
            with contextlib.suppress(OSError):
                await loop.create_connection(lambda: TcpSink(stats), host, port)
                made += 1
        print(json.dumps({"connected": made}), flush=True)

    def command(line: str) -> None:
        if line == "close":
            stats.close_all()
            print("{}", flush=True)
        elif line.startswith("connect "):
            _, host, port, count = line.split()
            pending.add(task := loop.create_task(connect(host, int(port), int(count))))
            task.add_done_callback(pending.discard)
        else:
            print(json.dumps(stats.snapshot()), flush=True)

    await _serve_stdin(loop, command)


class Source(asyncio.Protocol):
    def __init__(self, transports: set[asyncio.Transport]) -> None:
        self.transports = transports
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transports.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transports.discard(self.transport)


async def run_source(chunk: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    transports: set[asyncio.Transport] = set()
    server = await loop.create_server(lambda: Source(transports), LOOPBACK, 0, backlog=1024)
    print(json.dumps({"tcp": _port(server)}), flush=True)
    pacer = asyncio.create_task(_pace(transports, chunk, interval)) if chunk else None
    await _serve_stdin(loop, lambda _: print(json.dumps({"active": len(transports)}), flush=True))
    if pacer is not None:
        pacer.cancel()


async def _pace(transports: set[asyncio.Transport], chunk: int, interval: float) -> None:
    """Write ``chunk`` bytes to every connection each ``interval`` s, without drifting."""
    loop = asyncio.get_running_loop()
    payload = bytes(chunk)
    next_at = loop.time()
    while True:
        for transport in list(transports):
            if transport.get_write_buffer_size() < 4 * chunk:  # drop frames when stalled
                transport.write(payload)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def _serve_stdin(loop: asyncio.AbstractEventLoop, command: Any) -> None:
    """Run ``command(line)`` on the loop for each stdin line; return at end of input."""
    done = loop.create_future()

    def read() -> None:
        for raw in sys.stdin:
            loop.call_soon_threadsafe(command, raw.strip())
        loop.call_soon_threadsafe(finish)

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    threading.Thread(target=read, daemon=True).start()
    await done


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = parser.add_subparsers(dest="role", required=True)
    sink = sub.add_parser("sink")
    sink.add_argument("--cert")
    sink.add_argument("--key")
    source = sub.add_parser("source")
    source.add_argument("--chunk", type=int, default=20_000)
    source.add_argument("--interval", type=float, default=0.04)
    args = parser.parse_args()
    if args.role == "sink":
        coro = run_sink(args.cert, args.key)
    else:
        coro = run_source(args.chunk, args.interval)
    with contextlib.suppress(KeyboardInterrupt):
        try:  # a faster loop keeps the peers from being the bottleneck; asyncio works too
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            uvloop.run(coro)


if __name__ == "__main__":
    main()
