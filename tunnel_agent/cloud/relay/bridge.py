"""Join a consumer's TCP stream and a device's WebSocket until either side ends.

Each direction is one loop of read, send, await the send: the await is the backpressure, and at
most one read (``read_size_bytes``) is in flight per direction. When one direction ends, the other
is cancelled and both connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from aiohttp import WSMsgType, web

READ_SIZE_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 2.0


@dataclass
class ByteCounters:
    to_device: int = 0
    to_consumer: int = 0


async def bridge(
    ws: web.WebSocketResponse,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counters: ByteCounters,
    read_size_bytes: int = READ_SIZE_BYTES,
) -> str:
    """Pump bytes both ways; return why it ended."""

    async def consumer_to_device() -> str:
        while True:
            data = await reader.read(read_size_bytes)
            if not data:
                return "consumer closed"
            await ws.send_bytes(data)
            counters.to_device += len(data)

    async def device_to_consumer() -> str:
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                data = message.data
            elif message.type == WSMsgType.TEXT:
                data = message.data.encode()
            else:
                break
            writer.write(data)
            counters.to_consumer += len(data)
            await writer.drain()
        code = ws.close_code
        return f"device closed ({code})" if code is not None else "device closed"

    tasks = [
        asyncio.create_task(consumer_to_device()),
        asyncio.create_task(device_to_consumer()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        reason = first.result() if first.exception() is None else _describe(first.exception())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_both(ws, writer)
    return reason


async def close_both(ws: web.WebSocketResponse, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await ws.close()
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.wait_closed()


def _describe(exc: BaseException | None) -> str:
    return f"error: {type(exc).__name__}" if exc is not None else "error"
