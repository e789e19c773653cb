"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_any(*events: asyncio.Event) -> None:
    """Return as soon as one of ``events`` is set (no waiter is left behind)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def in_daemon_thread(work: Callable[[], T], name: str) -> T:
    """Run blocking ``work`` in a thread of its own that never holds up the process's exit.

    For third-party calls that can block for as long as they like (the IoT SDK waits on its one
    pipeline thread, which a hung TLS handshake can hold for a minute): the caller's deadline
    stays in force, and neither ``asyncio.run`` nor the interpreter waits for a stuck thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def report(setter: Callable[[Any], None], value: object) -> None:
        def settle() -> None:
            if not future.done():  # the caller may have given up (its deadline)
                setter(value)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the waiting coroutine
            report(future.set_exception, exc)
        else:
            report(future.set_result, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
