"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable


async def wait_any(*events: asyncio.Event) -> None:
    """Return as soon as one of ``events`` is set (no waiter is left behind)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def in_daemon_thread(function: Callable[[], object], name: str) -> None:
    """Run a blocking call in a thread of its own that never holds up the process's exit.

    ``asyncio.to_thread`` uses the loop's executor, whose threads the interpreter waits for at
    exit: a join that hangs there would make shutdown unbounded. Abandoned, this thread is not.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            function()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done
