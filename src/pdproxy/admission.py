"""Admission: a bounded FIFO queue for requests that find every slot taken.

A request is admitted at once when nobody is queued and `try_admit` succeeds.
Otherwise it waits its turn; only the head of the queue tries again, whenever
capacity may have come back (`wake`: a lease released, a request finished, an
upstream recovered), so order is kept and a release wakes one waiter, not all.
A waiter whose client goes away is cancelled and leaves the queue.

Requests for different servers (the pools of different models) wait in line per
`key`: each key's head tries on a wake, so a model whose servers are all busy never
holds back a request for another model's idle ones. One key (one model): one line.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable, Hashable
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
        self._lines: dict[Hashable, deque[_Waiter]] = {}  # per key, in arrival order; no empty line kept
        self._count = 0

    @property
    def waiting(self) -> int:
        return self._count

    async def admit(self, try_admit: Callable[[], T | None], key: Hashable = None) -> T:
        """Return what `try_admit` grants, waiting in `key`'s line if it grants nothing now.

        `try_admit` may raise to refuse outright (e.g. nothing routable at all).
        """
        line = self._lines.get(key) if self._lines else None  # nobody waiting: not even a lookup
        if line is None:
            granted = try_admit()
            if granted is not None:
                return granted
        if self._count >= self.max_waiting:
            raise QueueFull
        waiter = _Waiter()
        if line is None:
            line = self._lines[key] = deque()
        line.append(waiter)
        self._count += 1
        loop = asyncio.get_running_loop()
        try:
            async with deadline(self.timeout):
                while True:
                    if line[0] is waiter:
                        granted = try_admit()
                        if granted is not None:
                            return granted
                    waiter.future = loop.create_future()
                    await waiter.future
        except asyncio.TimeoutError:  # the builtin TimeoutError on 3.11+, not on 3.10
            raise QueueTimeout from None
        finally:
            line.remove(waiter)
            self._count -= 1
            if not line:
                del self._lines[key]
            self.wake()  # the next in line may go now: capacity left, or we left the head

    def wake(self) -> None:
        """Capacity may be back: let the head of each line try again."""
        for line in self._lines.values():
            future = line[0].future
            if future is not None and not future.done():
                future.set_result(None)
