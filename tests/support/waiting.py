"""Polling for a condition in async tests, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(
    predicate: Callable[[], object], timeout_s: float = 5.0, every_s: float = 0.02
) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(every_s)
