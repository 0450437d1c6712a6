"""Upstream health: the one place states change, rise/fall hysteresis, and active probing.

`StateBoard.set` is the only writer of `Upstream.state`: every change is logged
once with its reason, told to listeners (metrics, the admission queue) and wakes
whoever waits for it. The active checker and the passive outlier detector
(`outlier.py`) are separate; both only propose states through the board.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable

from pdproxy.client import CallError, UpstreamClient
from pdproxy.upstreams import State, Upstream

log = logging.getLogger("pdproxy.health")

Listener = Callable[[Upstream, State, State, str], None]
Probe = Callable[[Upstream], Awaitable["str | None"]]  # None: healthy; else why not


class StateBoard:
    """Applies state changes: one log line per change, listeners told, waiters woken."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def set(self, upstream: Upstream, state: State, reason: str) -> bool:
        """Move `upstream` to `state`; False (and silence) when it is already there."""
        old = upstream.state
        if old is state:
            return False
        upstream.state = state
        level = logging.INFO if state in (State.HEALTHY, State.UNKNOWN) else logging.WARNING
        log.log(level, "%s upstream %s: %s -> %s (%s)", upstream.role.value, upstream.url, old.value,
                state.value, reason)
        for listener in self._listeners:
            listener(upstream, old, state, reason)
        self.notify()
        return True

    def notify(self) -> None:
        """Re-check waiters: a state or the membership changed."""
        for check, future in self._waiters:
            if not future.done() and check():
                future.set_result(None)

    async def wait_for(self, check: Callable[[], bool], timeout: float) -> None:
        """Return once `check()` holds, re-checked after every state or membership change;
        TimeoutError otherwise."""
        if check():
            return
        entry = (check, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(entry[1], timeout)
        finally:
            self._waiters.remove(entry)


class Hysteresis:
    """Consecutive results: `fall` failures in a row mean down, `rise` successes in a row mean up."""

    __slots__ = ("failures", "fall", "rise", "successes")

    def __init__(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall
        self.successes = 0
        self.failures = 0

    def observe(self, ok: bool) -> bool | None:
        """Record one result; True once `rise` successes in a row, False once `fall` failures, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            return True if self.successes >= self.rise else None
        self.failures += 1
        self.successes = 0
        return False if self.failures >= self.fall else None


class ActiveHealthChecker:
    """Probes every upstream every `interval` seconds (±10% jitter so probes don't align).

    unknown --ok--> healthy; unknown --fail--> unhealthy (a new server that is down gets no traffic);
    warming --ok--> healthy (failures while an engine loads its weights are expected: no change);
    healthy --`fall` fails--> unhealthy --`rise` oks--> healthy;
    ejected --ok, once its ejection time is over--> healthy; ejected --`fall` fails--> unhealthy.
    Draining upstreams are probed but their state is the operator's.
    """

    def __init__(
        self,
        board: StateBoard,
        probe: Probe,
        *,
        interval: float,
        rise: int,
        fall: int,
        ejection_over: Callable[[Upstream], bool],
        rng: random.Random,
    ) -> None:
        self._board = board
        self._probe = probe
        self._interval = interval
        self._rise = rise
        self._fall = fall
        self._ejection_over = ejection_over
        self._rng = rng
        self._counters: dict[str, Hysteresis] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, upstreams: Iterable[Upstream]) -> None:
        for upstream in upstreams:
            self.watch(upstream)

    def watch(self, upstream: Upstream) -> None:
        """Start probing one upstream (first probe soon, so a dead new server is caught early)."""
        if upstream.id not in self._tasks:
            self._tasks[upstream.id] = asyncio.create_task(self._run(upstream), name=f"health {upstream.url}")

    def unwatch(self, upstream: Upstream) -> None:
        """Stop probing a removed upstream."""
        task = self._tasks.pop(upstream.id, None)
        if task is not None:
            task.cancel()
        self._counters.pop(upstream.id, None)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, upstream: Upstream) -> None:
        await asyncio.sleep(self._interval * self._rng.uniform(0, 0.1))
        while True:
            try:
                await self.check(upstream)
            except Exception:  # a bug must not end this upstream's checks for good
                log.exception("health check of %s failed unexpectedly", upstream.url)
            await asyncio.sleep(self._interval * self._rng.uniform(0.9, 1.1))

    async def check(self, upstream: Upstream) -> None:
        """Probe once and apply the result."""
        error = await self._probe(upstream)
        counter = self._counters.setdefault(upstream.id, Hysteresis(self._rise, self._fall))
        verdict = counter.observe(error is None)
        if error is not None:
            upstream.last_error = error
        state = upstream.state
        if state is State.UNKNOWN:
            if error is None:
                self._board.set(upstream, State.HEALTHY, "health probe ok")
            else:
                self._board.set(upstream, State.UNHEALTHY, f"first health probe failed: {error}")
        elif state is State.WARMING:
            if error is None:
                self._board.set(upstream, State.HEALTHY, "first good health probe: warm-up done")
        elif state is State.HEALTHY and verdict is False:
            self._board.set(upstream, State.UNHEALTHY, f"{counter.failures} health probes failed, last: {error}")
        elif state is State.UNHEALTHY and verdict is True:
            self._board.set(upstream, State.HEALTHY, f"{counter.successes} health probes ok")
        elif state is State.EJECTED:
            if error is None and self._ejection_over(upstream):
                self._board.set(upstream, State.HEALTHY, "health probe ok after its ejection time")
            elif verdict is False:
                self._board.set(upstream, State.UNHEALTHY,
                                f"{counter.failures} health probes failed while ejected, last: {error}")


PROBE_MAX_BYTES = 64 * 1024  # a health answer larger than this is not a health answer


def http_probe(client: Callable[[], UpstreamClient | None], path: str, timeout: float) -> Probe:
    """GET <upstream><path> with the process's upstream client: any 2xx within `timeout` is healthy."""

    async def probe(upstream: Upstream) -> str | None:
        upstreams = client()
        assert upstreams is not None, "probes run only while the application runs"
        try:
            resp = await upstreams.fetch(upstream.url, "GET", path, timeout=timeout, max_bytes=PROBE_MAX_BYTES)
        except CallError as exc:
            if exc.kind in ("timeout", "first_byte_timeout", "connect_timeout"):
                return f"GET {path} timed out after {timeout:g}s"
            return f"GET {path} failed: {str(exc) or exc.kind}"
        return None if 200 <= resp.status < 300 else f"GET {path} answered {resp.status}"

    return probe
