"""Admission: a bounded FIFO queue for requests that find every slot taken.

A request is admitted at once when nobody is queued and `try_admit` succeeds.
Otherwise it waits its turn; only the head of the queue tries again, whenever
capacity may have come back (`wake`: a lease released, a request finished, an
upstream recovered), so order is kept and a release wakes one waiter, not all.
A waiter whose client goes away is cancelled and leaves the queue.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from typing import TypeVar

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover - aiohttp depends on async-timeout there
    from async_timeout import timeout as deadline

T = TypeVar("T")


class QueueFull(Exception):
    """The queue already holds its maximum of waiting requests."""


class QueueTimeout(Exception):
    """The request waited its maximum time without getting a slot."""


class _Waiter:
    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None


class AdmissionQueue:
    """FIFO waiting room in front of a capacity check."""

    def __init__(self, max_waiting: int, timeout: float) -> None:
        self.max_waiting = max_waiting
        self.timeout = timeout
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def admit(self, try_admit: Callable[[], T | None]) -> T:
        """Return what `try_admit` grants, waiting in line if it grants nothing now.

        `try_admit` may raise to refuse outright (e.g. nothing routable at all).
        """
        if not self._waiters:
            granted = try_admit()
            if granted is not None:
                return granted
        if len(self._waiters) >= self.max_waiting:
            raise QueueFull
        waiter = _Waiter()
        self._waiters.append(waiter)
        loop = asyncio.get_running_loop()
        try:
            async with deadline(self.timeout):
                while True:
                    if self._waiters[0] is waiter:
                        granted = try_admit()
                        if granted is not None:
                            return granted
                    waiter.future = loop.create_future()
                    await waiter.future
        except asyncio.TimeoutError:  # the builtin TimeoutError on 3.11+, not on 3.10
            raise QueueTimeout from None
        finally:
            self._waiters.remove(waiter)
            self.wake()  # the next in line may go now: capacity left, or we left the head

    def wake(self) -> None:
        """Capacity may be back: let the head of the queue try again."""
        if self._waiters:
            future = self._waiters[0].future
            if future is not None and not future.done():
                future.set_result(None)
