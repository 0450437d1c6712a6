"""Health: the state board, rise/fall hysteresis, the active checker's state machine, and the HTTP probe."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from pdproxy.client import ClientOptions, ConnectionLost, UpstreamClient
from pdproxy.health import ActiveHealthChecker, Hysteresis, StateBoard, http_probe
from pdproxy.upstreams import Role, State, Upstream

OK = None
FAIL = "GET /health answered 503"


def up(state: State = State.UNKNOWN, url: str = "http://10.0.0.1:8000", role: Role = Role.PREFILL) -> Upstream:
    return Upstream(role, url, state=state)


async def spin_until(predicate: Callable[[], bool], what: str = "condition", spins: int = 50) -> None:
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not happen within {spins} loop turns")


# ---------------------------------------------------------------- Hysteresis


@pytest.mark.parametrize(
    ("rise", "fall", "results", "verdicts"),
    [
        (2, 3, [True, True, True], [None, True, True]),
        (2, 3, [False, False, False, False], [None, None, False, False]),
        (1, 1, [True, False, True, False], [True, False, True, False]),
        # the opposite result resets the count
        (2, 3, [True, False, True, True], [None, None, None, True]),
        (2, 3, [False, False, True, False, False, False], [None, None, None, None, None, False]),
        (3, 2, [True, True, False, True, True, True], [None, None, None, None, None, True]),
    ],
)
def test_hysteresis_sequences(rise: int, fall: int, results: list[bool], verdicts: list[bool | None]) -> None:
    counter = Hysteresis(rise, fall)
    assert [counter.observe(ok) for ok in results] == verdicts


def test_hysteresis_counters_reset_on_opposite_result() -> None:
    counter = Hysteresis(rise=3, fall=3)
    counter.observe(True)
    counter.observe(True)
    assert (counter.successes, counter.failures) == (2, 0)
    counter.observe(False)
    assert (counter.successes, counter.failures) == (0, 1)
    counter.observe(True)
    assert (counter.successes, counter.failures) == (1, 0)


# ---------------------------------------------------------------- StateBoard


def health_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pdproxy.health"]


def test_set_unchanged_returns_false_and_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pdproxy.health")
    board = StateBoard()
    heard: list[tuple[Any, ...]] = []
    board.listen(lambda *args: heard.append(args))
    u = up(State.HEALTHY)
    assert board.set(u, State.HEALTHY, "still fine") is False
    assert u.state is State.HEALTHY
    assert health_lines(caplog) == []
    assert heard == []


def test_set_logs_one_line_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pdproxy.health")
    board = StateBoard()
    u = up(url="http://10.0.0.7:8200", role=Role.DECODE)
    assert board.set(u, State.UNHEALTHY, "connect refused") is True
    assert u.state is State.UNHEALTHY
    assert board.set(u, State.UNHEALTHY, "again") is False
    assert board.set(u, State.HEALTHY, "probe ok") is True
    lines = health_lines(caplog)
    assert len(lines) == 2
    first, second = (r.getMessage() for r in lines)
    for part in ("decode", "http://10.0.0.7:8200", "unknown -> unhealthy", "connect refused"):
        assert part in first
    for part in ("decode", "http://10.0.0.7:8200", "unhealthy -> healthy", "probe ok"):
        assert part in second
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]


def test_listeners_are_told_each_change() -> None:
    board = StateBoard()
    heard: list[tuple[Upstream, State, State, str]] = []
    also: list[State] = []
    board.listen(lambda u, old, new, reason: heard.append((u, old, new, reason)))
    board.listen(lambda u, old, new, reason: also.append(new))
    u = up()
    board.set(u, State.HEALTHY, "probe ok")
    board.set(u, State.HEALTHY, "probe ok")
    board.set(u, State.EJECTED, "5 consecutive failures")
    assert heard == [(u, State.UNKNOWN, State.HEALTHY, "probe ok"),
                     (u, State.HEALTHY, State.EJECTED, "5 consecutive failures")]
    assert also == [State.HEALTHY, State.EJECTED]


def test_listener_sees_the_new_state_already_applied() -> None:
    board = StateBoard()
    seen: list[State] = []
    board.listen(lambda u, old, new, reason: seen.append(u.state))
    board.set(up(), State.DRAINING, "operator")
    assert seen == [State.DRAINING]


async def test_wait_for_returns_at_once_when_already_true() -> None:
    board = StateBoard()
    u = up(State.HEALTHY)
    await asyncio.wait_for(board.wait_for(lambda: u.state is State.HEALTHY, timeout=0), 1)


async def test_wait_for_returns_after_a_matching_change() -> None:
    board = StateBoard()
    u = up()
    waiter = asyncio.ensure_future(board.wait_for(lambda: u.state is State.HEALTHY, timeout=5))
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        board.set(u, State.UNHEALTHY, "down")  # not what it waits for
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        board.set(u, State.HEALTHY, "up")
        await spin_until(waiter.done, "wait_for to return")
        assert waiter.result() is None
    finally:
        waiter.cancel()


async def test_wait_for_times_out() -> None:
    board = StateBoard()
    u = up()
    with pytest.raises(asyncio.TimeoutError):
        await board.wait_for(lambda: u.state is State.HEALTHY, timeout=0.01)
    assert board.set(u, State.HEALTHY, "later") is True  # the expired waiter is gone, nothing breaks


async def test_wait_for_several_waiters_each_on_its_own_condition() -> None:
    board = StateBoard()
    a, b = up(url="http://a:1"), up(url="http://b:1")
    wait_a = asyncio.ensure_future(board.wait_for(lambda: a.state is State.EJECTED, timeout=5))
    wait_b = asyncio.ensure_future(board.wait_for(lambda: b.state is State.EJECTED, timeout=5))
    try:
        await asyncio.sleep(0)
        board.set(a, State.EJECTED, "x")
        await spin_until(wait_a.done, "a's waiter")
        assert not wait_b.done()
        board.set(b, State.EJECTED, "x")
        await spin_until(wait_b.done, "b's waiter")
    finally:
        wait_a.cancel()
        wait_b.cancel()


async def test_notify_rechecks_waiters_without_a_state_change() -> None:
    board = StateBoard()
    members: list[str] = []
    waiter = asyncio.ensure_future(board.wait_for(lambda: "http://a:1" in members, timeout=5))
    try:
        await asyncio.sleep(0)
        board.notify()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        members.append("http://a:1")  # e.g. a membership change: no state moved
        board.notify()
        await spin_until(waiter.done, "wait_for after notify")
    finally:
        waiter.cancel()


def test_notify_without_waiters_is_harmless() -> None:
    StateBoard().notify()


# ---------------------------------------------------------------- ActiveHealthChecker.check


class ScriptedProbe:
    """Returns scripted results in order (None: healthy, else the error); records who was probed."""

    def __init__(self, *results: str | None) -> None:
        self.results = list(results)
        self.probed: list[Upstream] = []

    async def __call__(self, upstream: Upstream) -> str | None:
        self.probed.append(upstream)
        return self.results.pop(0)


class Ejection:
    """What the outlier detector would answer for `ejection_over`."""

    def __init__(self, over: bool = True) -> None:
        self.over = over
        self.asked: list[Upstream] = []

    def __call__(self, upstream: Upstream) -> bool:
        self.asked.append(upstream)
        return self.over


def make_checker(
    probe: Any, *, rise: int = 2, fall: int = 2, ejection: Ejection | None = None, board: StateBoard | None = None,
    interval: float = 60.0,
) -> ActiveHealthChecker:
    return ActiveHealthChecker(
        board or StateBoard(), probe, interval=interval, rise=rise, fall=fall,
        ejection_over=ejection or Ejection(), rng=random.Random(0),
    )


async def states_after(checker: ActiveHealthChecker, upstream: Upstream, n: int) -> list[State]:
    states = []
    for _ in range(n):
        await checker.check(upstream)
        states.append(upstream.state)
    return states


async def test_unknown_ok_becomes_healthy_at_once() -> None:
    u = up()
    checker = make_checker(ScriptedProbe(OK), rise=3)
    assert await states_after(checker, u, 1) == [State.HEALTHY]
    assert u.last_error is None


async def test_unknown_fail_becomes_unhealthy_at_once() -> None:
    u = up()
    checker = make_checker(ScriptedProbe("GET /health failed: refused"), fall=3)
    assert await states_after(checker, u, 1) == [State.UNHEALTHY]
    assert u.last_error == "GET /health failed: refused"


async def test_healthy_falls_after_fall_consecutive_failures() -> None:
    u = up(State.HEALTHY)
    board = StateBoard()
    reasons: list[str] = []
    board.listen(lambda _u, _old, _new, reason: reasons.append(reason))
    checker = make_checker(ScriptedProbe(FAIL, FAIL, "timed out"), fall=3, board=board)
    assert await states_after(checker, u, 3) == [State.HEALTHY, State.HEALTHY, State.UNHEALTHY]
    assert u.last_error == "timed out"
    assert len(reasons) == 1
    assert "3" in reasons[0]
    assert "timed out" in reasons[0]


async def test_healthy_failure_count_resets_on_ok() -> None:
    u = up(State.HEALTHY)
    checker = make_checker(ScriptedProbe(FAIL, OK, FAIL, OK, FAIL, FAIL), fall=2)
    assert await states_after(checker, u, 6) == [State.HEALTHY] * 5 + [State.UNHEALTHY]


async def test_flapping_never_leaves_healthy_with_fall_two() -> None:
    u = up(State.HEALTHY)
    results = [OK, FAIL] * 10
    checker = make_checker(ScriptedProbe(*results), fall=2)
    assert set(await states_after(checker, u, len(results))) == {State.HEALTHY}
    assert u.last_error == FAIL  # the failures are still remembered


async def test_unhealthy_needs_rise_consecutive_oks() -> None:
    u = up(State.UNHEALTHY)
    checker = make_checker(ScriptedProbe(OK, OK, FAIL, OK, OK, OK), rise=3)
    assert await states_after(checker, u, 6) == [State.UNHEALTHY] * 5 + [State.HEALTHY]


async def test_unhealthy_stays_unhealthy_while_failing() -> None:
    u = up(State.UNHEALTHY)
    checker = make_checker(ScriptedProbe(FAIL, FAIL, FAIL), rise=1, fall=1)
    assert await states_after(checker, u, 3) == [State.UNHEALTHY] * 3


async def test_first_failure_then_recovery_needs_rise() -> None:
    u = up()
    checker = make_checker(ScriptedProbe(FAIL, OK, OK), rise=2, fall=5)
    assert await states_after(checker, u, 3) == [State.UNHEALTHY, State.UNHEALTHY, State.HEALTHY]


async def test_ejected_ok_stays_ejected_while_ejection_not_over() -> None:
    u = up(State.EJECTED)
    ejection = Ejection(over=False)
    checker = make_checker(ScriptedProbe(OK, OK, OK, OK), rise=1, ejection=ejection)
    assert await states_after(checker, u, 4) == [State.EJECTED] * 4
    assert ejection.asked == [u] * 4


async def test_ejected_ok_after_ejection_over_becomes_healthy() -> None:
    u = up(State.EJECTED)
    ejection = Ejection(over=False)
    checker = make_checker(ScriptedProbe(OK, OK), rise=5, ejection=ejection)
    assert await states_after(checker, u, 1) == [State.EJECTED]
    ejection.over = True
    assert await states_after(checker, u, 1) == [State.HEALTHY]  # one ok is enough, `rise` does not apply


async def test_ejected_failures_make_it_unhealthy() -> None:
    u = up(State.EJECTED)
    checker = make_checker(ScriptedProbe(FAIL, FAIL, FAIL), fall=3, ejection=Ejection(over=False))
    assert await states_after(checker, u, 3) == [State.EJECTED, State.EJECTED, State.UNHEALTHY]


async def test_ejected_failure_when_ejection_over_does_not_return_it() -> None:
    u = up(State.EJECTED)
    checker = make_checker(ScriptedProbe(FAIL), fall=3, ejection=Ejection(over=True))
    assert await states_after(checker, u, 1) == [State.EJECTED]


async def test_warming_failures_are_expected_and_change_nothing() -> None:
    u = up(State.WARMING)
    probe = ScriptedProbe(FAIL, FAIL, FAIL, FAIL)
    checker = make_checker(probe, rise=2, fall=1)
    assert await states_after(checker, u, 4) == [State.WARMING] * 4
    assert u.last_error == FAIL


async def test_warming_first_ok_becomes_healthy_without_rise() -> None:
    u = up(State.WARMING)
    checker = make_checker(ScriptedProbe(FAIL, FAIL, OK), rise=3, fall=1)
    assert await states_after(checker, u, 3) == [State.WARMING, State.WARMING, State.HEALTHY]


async def test_draining_is_probed_but_untouched() -> None:
    u = up(State.DRAINING)
    probe = ScriptedProbe(FAIL, FAIL, FAIL, OK, OK, OK)
    checker = make_checker(probe, rise=1, fall=1)
    assert await states_after(checker, u, 6) == [State.DRAINING] * 6
    assert len(probe.probed) == 6
    assert u.last_error == FAIL


async def test_counters_are_per_upstream() -> None:
    a, b = up(State.HEALTHY, url="http://a:1"), up(State.HEALTHY, url="http://b:1")
    checker = make_checker(ScriptedProbe(FAIL, FAIL, FAIL), fall=2)
    await checker.check(a)
    await checker.check(b)  # b's first failure: a's does not count for it
    assert (a.state, b.state) == (State.HEALTHY, State.HEALTHY)
    await checker.check(a)
    assert (a.state, b.state) == (State.UNHEALTHY, State.HEALTHY)


# ---------------------------------------------------------------- start / watch / stop


class CountingProbe:
    """Always healthy; sets `done` once every expected upstream has been probed `n` times."""

    def __init__(self, expected: list[Upstream], n: int) -> None:
        self.expected = expected
        self.n = n
        self.calls: dict[str, int] = {}
        self.done = asyncio.Event()

    async def __call__(self, upstream: Upstream) -> str | None:
        self.calls[upstream.url] = self.calls.get(upstream.url, 0) + 1
        if all(self.calls.get(u.url, 0) >= self.n for u in self.expected):
            self.done.set()
        return None


async def stop(checker: ActiveHealthChecker) -> None:
    await asyncio.wait_for(checker.stop(), 1)


def health_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("health ") and not t.done()]


async def test_start_probes_every_upstream_repeatedly_and_stop_cancels() -> None:
    ups = [up(url=f"http://10.0.0.{i}:8000") for i in range(3)]
    probe = CountingProbe(ups, n=3)
    checker = make_checker(probe, interval=0.01)
    checker.start(ups)
    try:
        assert len(health_tasks()) == 3
        await asyncio.wait_for(probe.done.wait(), 2)
        assert all(u.state is State.HEALTHY for u in ups)
    finally:
        await stop(checker)
    assert health_tasks() == []
    calls = dict(probe.calls)
    for _ in range(10):
        await asyncio.sleep(0)
    assert probe.calls == calls


async def test_watch_is_idempotent_and_adds_new_upstreams() -> None:
    first, late = up(url="http://a:1"), up(url="http://b:1")
    probe = CountingProbe([first, late], n=2)
    checker = make_checker(probe, interval=0.01)
    checker.start([first])
    try:
        checker.watch(first)
        assert len(health_tasks()) == 1
        checker.watch(late)
        assert len(health_tasks()) == 2
        await asyncio.wait_for(probe.done.wait(), 2)
    finally:
        await stop(checker)
    assert health_tasks() == []


async def test_unwatch_stops_probing_one_upstream_and_forgets_its_counter() -> None:
    kept, gone = up(url="http://a:1"), up(url="http://b:1")
    probe = CountingProbe([kept, gone], n=1)
    checker = make_checker(probe, interval=0.01, fall=2)
    checker.start([kept, gone])
    try:
        await asyncio.wait_for(probe.done.wait(), 2)
        checker.unwatch(gone)
        await spin_until(lambda: len(health_tasks()) == 1, "gone's task to end")
        assert [t.get_name() for t in health_tasks()] == ["health http://a:1"]
        checker.unwatch(gone)  # twice: harmless
    finally:
        await stop(checker)
    # The counter was forgotten: a re-added upstream starts from zero failures.
    again = make_checker(ScriptedProbe(FAIL, FAIL, FAIL), fall=2)
    u = up(State.HEALTHY)
    await again.check(u)
    again.unwatch(u)
    await again.check(u)
    assert u.state is State.HEALTHY
    await again.check(u)
    assert u.state is State.UNHEALTHY


async def test_stop_without_start_and_twice_is_harmless() -> None:
    checker = make_checker(ScriptedProbe())
    await stop(checker)
    checker.start([up()])
    await stop(checker)
    await stop(checker)
    assert health_tasks() == []


async def test_watch_again_after_stop_restarts_probing() -> None:
    u = up()
    probe = CountingProbe([u], n=1)
    checker = make_checker(probe, interval=0.01)
    checker.start([u])
    await stop(checker)
    checker.watch(u)
    try:
        await asyncio.wait_for(probe.done.wait(), 2)
    finally:
        await stop(checker)


async def test_stop_cancels_a_probe_in_progress() -> None:
    u = up()
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(_: Upstream) -> str | None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return None

    checker = make_checker(stuck, interval=0.01)
    checker.start([u])
    await asyncio.wait_for(entered.wait(), 2)
    await stop(checker)
    assert cancelled.is_set()
    assert u.state is State.UNKNOWN
    assert health_tasks() == []


# ---------------------------------------------------------------- http_probe


@pytest.fixture
async def probe_server() -> AsyncIterator[str]:
    """Loopback server: /ok 200, /empty 204, /bad 503, /missing 404, /hang never answers (released at teardown)."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/ok", answer(200))
    app.router.add_get("/empty", answer(204))
    app.router.add_get("/bad", answer(503))
    app.router.add_get("/hang", hang)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        release.set()
        await runner.cleanup()


def answer(status: int) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=None if status == 204 else "body")

    return handler


@pytest.fixture
async def session() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(ClientOptions(connect_timeout=1.0))
    yield client
    await client.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_http_probe_2xx_is_healthy(probe_server: str, session: UpstreamClient) -> None:
    target = Upstream(Role.PREFILL, probe_server)
    assert await http_probe(lambda: session, "/ok", 1.0)(target) is None
    assert await http_probe(lambda: session, "/empty", 1.0)(target) is None


async def test_http_probe_error_status(probe_server: str, session: UpstreamClient) -> None:
    target = Upstream(Role.PREFILL, probe_server)
    assert await http_probe(lambda: session, "/bad", 1.0)(target) == "GET /bad answered 503"
    assert await http_probe(lambda: session, "/missing", 1.0)(target) == "GET /missing answered 404"


async def test_http_probe_timeout(probe_server: str, session: UpstreamClient) -> None:
    target = Upstream(Role.DECODE, probe_server)
    assert await http_probe(lambda: session, "/hang", 0.05)(target) == "GET /hang timed out after 0.05s"


async def test_http_probe_closed_port(session: UpstreamClient) -> None:
    reason = await http_probe(lambda: session, "/health", 1.0)(Upstream(Role.PREFILL, closed_port_url()))
    assert reason is not None
    assert reason.startswith("GET /health failed: ")
    assert len(reason) > len("GET /health failed: ")


async def test_http_probe_drives_the_checker(probe_server: str, session: UpstreamClient) -> None:
    good, bad = Upstream(Role.PREFILL, probe_server), Upstream(Role.PREFILL, closed_port_url())
    checker = make_checker(http_probe(lambda: session, "/ok", 1.0))
    await checker.check(good)
    await checker.check(bad)
    assert (good.state, bad.state) == (State.HEALTHY, State.UNHEALTHY)
    assert bad.last_error is not None and "failed" in bad.last_error


class _RaisingClient:
    """Stands in for an UpstreamClient whose calls fail with `exc` (no network)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def fetch(self, *args: Any, **kwargs: Any) -> None:
        raise self.exc


def raising(exc: BaseException) -> Callable[[], UpstreamClient]:
    """A client getter whose client fails every call with `exc`."""
    fake = _RaisingClient(exc)
    return lambda: fake  # type: ignore[return-value]


async def test_http_probe_failure_with_message_keeps_it() -> None:
    probe = http_probe(raising(ConnectionLost("http://x:1 closed the connection")), "/health", 1.0)
    assert await probe(up()) == "GET /health failed: http://x:1 closed the connection"


async def test_http_probe_failure_without_message_names_the_error() -> None:
    probe = http_probe(raising(ConnectionLost("")), "/health", 1.0)
    assert await probe(up()) == "GET /health failed: connection_lost"
