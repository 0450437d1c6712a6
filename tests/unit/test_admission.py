"""Admission queue: fast path, strict FIFO, head-only retries, bounds, timeout, cancellation, refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from pdproxy.admission import AdmissionQueue, QueueFull, QueueTimeout

SPINS = 50


async def spin_until(predicate: Callable[[], bool], what: str = "condition") -> None:
    """Yield to the loop until `predicate()` holds; fail after a fixed number of turns (no wall-clock sleeps)."""
    for _ in range(SPINS):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not happen within {SPINS} loop turns")


async def settle() -> None:
    """Give every ready task several turns (used before asserting that something did NOT happen)."""
    for _ in range(10):
        await asyncio.sleep(0)


def waiting_is(queue: AdmissionQueue, n: int) -> Callable[[], bool]:
    return lambda: queue.waiting == n


def length_is(items: list[str], n: int) -> Callable[[], bool]:
    return lambda: len(items) == n


class Capacity:
    """Slots shared by all waiters; each waiter gets its own try_admit that records its calls."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.calls: list[str] = []
        self.fail: dict[str, Exception] = {}

    def taker(self, name: str) -> Callable[[], str | None]:
        def try_admit() -> str | None:
            self.calls.append(name)
            if name in self.fail:
                raise self.fail[name]
            if self.free > 0:
                self.free -= 1
                return name
            return None

        return try_admit

    def count(self, name: str) -> int:
        return self.calls.count(name)


Spawn = Callable[[Coroutine[Any, Any, str]], "asyncio.Task[str]"]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start tasks; whatever is still pending after the test is cancelled and awaited."""
    tasks: list[asyncio.Task[str]] = []

    def start(coro: Coroutine[Any, Any, str]) -> asyncio.Task[str]:
        task = asyncio.ensure_future(coro)
        tasks.append(task)
        return task

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def enqueue(queue: AdmissionQueue, capacity: Capacity, spawn: Spawn, *names: str) -> list[asyncio.Task[str]]:
    """Start one waiter per name, each fully queued before the next arrives."""
    tasks = []
    for name in names:
        expected = queue.waiting + 1
        tasks.append(spawn(queue.admit(capacity.taker(name))))
        await spin_until(waiting_is(queue, expected), f"{name} queued")
    return tasks


# ---------------------------------------------------------------- fast path


async def test_fast_path_grants_immediately_when_nobody_waits() -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=5)
    capacity = Capacity(free=1)
    assert await queue.admit(capacity.taker("a")) == "a"
    assert capacity.calls == ["a"]
    assert queue.waiting == 0


async def test_fast_path_returns_any_non_none_grant() -> None:
    queue = AdmissionQueue(max_waiting=0, timeout=5)
    assert await queue.admit(lambda: 0) == 0  # a falsy grant is still a grant
    assert await queue.admit(lambda: "") == ""


async def test_no_grant_means_wait(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=5)
    capacity = Capacity()
    (task,) = await enqueue(queue, capacity, spawn, "a")
    await settle()
    assert not task.done()
    assert queue.waiting == 1


async def test_wake_lets_the_head_retry(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=5)
    capacity = Capacity()
    (task,) = await enqueue(queue, capacity, spawn, "a")
    await settle()
    before = capacity.count("a")
    queue.wake()  # still nothing free: one more try, still waiting
    await spin_until(lambda: capacity.count("a") == before + 1, "retry after wake")
    await settle()
    assert capacity.count("a") == before + 1
    assert not task.done()
    capacity.free = 1
    queue.wake()
    assert await asyncio.wait_for(task, 1) == "a"
    assert queue.waiting == 0


async def test_capacity_without_wake_is_not_noticed(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=5)
    capacity = Capacity()
    (task,) = await enqueue(queue, capacity, spawn, "a")
    capacity.free = 1
    await settle()
    assert not task.done()  # the queue retries on wake(), it does not poll


async def test_wake_on_empty_queue_is_harmless() -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=5)
    queue.wake()
    assert queue.waiting == 0


# ---------------------------------------------------------------- FIFO


async def test_granted_in_arrival_order_one_slot_at_a_time(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    tasks = await enqueue(queue, capacity, spawn, "a", "b", "c")
    granted: list[str] = []
    for task in tasks:
        task.add_done_callback(lambda t: granted.append(t.result()))
    for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
        capacity.free = 1
        queue.wake()
        await spin_until(length_is(granted, len(expected)), "a grant")
        await settle()
        assert granted == expected
    assert queue.waiting == 0


async def test_granted_in_arrival_order_when_capacity_for_all_returns_at_once(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    tasks = await enqueue(queue, capacity, spawn, "a", "b", "c")
    granted: list[str] = []
    for task in tasks:
        task.add_done_callback(lambda t: granted.append(t.result()))
    capacity.free = 3
    queue.wake()  # one wake: each admitted waiter passes the turn to the next
    await spin_until(lambda: len(granted) == 3, "three grants")
    assert granted == ["a", "b", "c"]
    assert capacity.free == 0


async def test_new_arrival_does_not_overtake_queued_waiters(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    (first,) = await enqueue(queue, capacity, spawn, "a")
    capacity.free = 1  # a slot is free, but "a" was first
    (late,) = await enqueue(queue, capacity, spawn, "late")
    await settle()
    assert capacity.count("late") == 0  # not even tried: there was a queue
    assert not late.done()
    assert capacity.free == 1
    queue.wake()
    assert await asyncio.wait_for(first, 1) == "a"
    await settle()
    assert not late.done()  # "a" took the only slot
    capacity.free = 1
    queue.wake()
    assert await asyncio.wait_for(late, 1) == "late"


async def test_only_the_head_calls_try_admit(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    await enqueue(queue, capacity, spawn, "a", "b", "c")
    await settle()
    head_calls = capacity.count("a")
    for _ in range(5):
        queue.wake()
        await settle()
    assert capacity.count("a") == head_calls + 5
    assert capacity.count("b") == 0
    assert capacity.count("c") == 0


# ---------------------------------------------------------------- bounds and timeout


async def test_queue_full_at_max_waiting(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=2, timeout=5)
    capacity = Capacity()
    await enqueue(queue, capacity, spawn, "a", "b")
    with pytest.raises(QueueFull):
        await queue.admit(capacity.taker("c"))
    assert queue.waiting == 2
    assert capacity.count("c") == 0


async def test_queue_full_even_when_capacity_is_free_but_others_wait(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=1, timeout=5)
    capacity = Capacity()
    await enqueue(queue, capacity, spawn, "a")
    capacity.free = 1
    with pytest.raises(QueueFull):
        await queue.admit(capacity.taker("b"))


async def test_max_waiting_zero_refuses_any_wait() -> None:
    queue = AdmissionQueue(max_waiting=0, timeout=5)
    capacity = Capacity()
    with pytest.raises(QueueFull):
        await queue.admit(capacity.taker("a"))
    assert capacity.calls == ["a"]  # it did try the fast path
    assert queue.waiting == 0
    capacity.free = 1
    assert await queue.admit(capacity.taker("b")) == "b"


async def test_timeout_raises_queue_timeout_and_leaves_the_queue() -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=0.05)
    capacity = Capacity()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(QueueTimeout):
        await queue.admit(capacity.taker("a"))
    assert loop.time() - started >= 0.04
    assert queue.waiting == 0


async def test_timeout_is_not_a_plain_timeout_error() -> None:
    queue = AdmissionQueue(max_waiting=4, timeout=0.01)
    with pytest.raises(QueueTimeout) as info:
        await queue.admit(lambda: None)
    assert not isinstance(info.value, asyncio.TimeoutError)
    assert info.value.__cause__ is None


# ---------------------------------------------------------------- cancellation and refusals


async def test_cancelled_head_leaves_and_the_next_proceeds(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    a, b = await enqueue(queue, capacity, spawn, "a", "b")
    capacity.free = 1  # no wake(): the head's leaving must pass the turn on by itself
    a.cancel()
    assert await asyncio.wait_for(b, 1) == "b"
    assert a.cancelled()
    assert queue.waiting == 0


async def test_cancelled_middle_waiter_leaves_and_order_is_kept(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    a, b, c = await enqueue(queue, capacity, spawn, "a", "b", "c")
    b.cancel()
    await spin_until(lambda: queue.waiting == 2, "b left")
    assert capacity.count("b") == 0
    capacity.free = 1
    queue.wake()
    assert await asyncio.wait_for(a, 1) == "a"
    await settle()
    assert not c.done()
    capacity.free = 1
    queue.wake()
    assert await asyncio.wait_for(c, 1) == "c"


async def test_exception_from_try_admit_reaches_the_waiter_and_the_queue_moves_on(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    a, b = await enqueue(queue, capacity, spawn, "a", "b")
    refusal = RuntimeError("nothing routable")
    capacity.fail["a"] = refusal
    capacity.free = 1
    queue.wake()
    with pytest.raises(RuntimeError) as info:
        await asyncio.wait_for(a, 1)
    assert info.value is refusal
    assert await asyncio.wait_for(b, 1) == "b"
    assert queue.waiting == 0


async def test_exception_on_the_fast_path_propagates_without_queueing() -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)

    def refuse() -> None:
        raise LookupError("no upstream")

    with pytest.raises(LookupError):
        await queue.admit(refuse)
    assert queue.waiting == 0


async def test_waiting_counts_queued_requests(spawn: Spawn) -> None:
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    capacity = Capacity()
    assert queue.waiting == 0
    tasks = await enqueue(queue, capacity, spawn, "a", "b", "c")
    assert queue.waiting == 3
    capacity.free = 3
    queue.wake()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert queue.waiting == 0


async def test_each_key_waits_in_its_own_line() -> None:
    """A request whose servers (its model's) are busy holds back only requests of the same key."""
    queue = AdmissionQueue(max_waiting=10, timeout=5)
    free = {"a": 0, "b": 0}
    admitted: list[str] = []

    def take(key: str) -> Callable[[], str | None]:
        def try_admit() -> str | None:
            if free[key]:
                free[key] -= 1
                return key
            return None
        return try_admit

    async def request(key: str, name: str) -> None:
        await queue.admit(take(key), key)
        admitted.append(name)

    first_a = asyncio.ensure_future(request("a", "a1"))
    second_a = asyncio.ensure_future(request("a", "a2"))
    await spin_until(waiting_is(queue, 2), "two a requests queued")
    free["b"] = 1
    await asyncio.wait_for(request("b", "b1"), 1)  # a's line is not b's: admitted at once
    assert admitted == ["b1"] and queue.waiting == 2
    free["a"] = 1
    queue.wake()
    await spin_until(length_is(admitted, 2), "a1 admitted")
    await settle()
    assert admitted == ["b1", "a1"]  # a's line is FIFO: a2 still waits
    free["a"] = 1
    queue.wake()
    await asyncio.wait_for(asyncio.gather(first_a, second_a), 1)
    assert admitted == ["b1", "a1", "a2"] and queue.waiting == 0
