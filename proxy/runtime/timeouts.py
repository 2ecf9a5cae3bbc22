"""One await bounded in time, at the cost of one timer.

Owns: `within`, used on every connection (session start-up, backend connect). Must not do
anything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def within(delay: float, awaitable: Coroutine[Any, Any, T]) -> T:
    """`awaitable` within `delay` seconds, else TimeoutError: asyncio.timeout's job for one
    await, at the cost of one timer. (Per connection, twice: an asyncio.timeout block is a
    Timeout object, two more coroutines and a reschedule, ~5.4 us against ~1.5 here,
    benchmarks/connmicro.py.) As asyncio.timeout, a cancellation that is not ours (shutdown)
    stays a CancelledError."""
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(delay, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if fired and task.uncancel() <= cancelling:
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
