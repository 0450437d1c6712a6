"""Passive outlier detection: consecutive failures, growing ejection time, max share, return on expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from pdproxy.health import StateBoard
from pdproxy.outlier import ConsecutiveFailureDetector, NoOutlierDetection
from pdproxy.upstreams import ROUTABLE_STATES, Role, State, Upstream, UpstreamPool


class FakeClock:
    """Time stands still until the test moves it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Setup:
    """A board, one pool per role, a detector over them, and every transition the board made."""

    def __init__(
        self, n: int = 2, *, eject_after: int = 3, base_time: float = 1.0, max_time: float = 3.0,
        max_share: float = 1.0, return_on_expiry: bool = False, clock: Callable[[], float] | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.board = StateBoard()
        self.transitions: list[tuple[Upstream, State, State, str]] = []
        self.board.listen(lambda u, old, new, reason: self.transitions.append((u, old, new, reason)))
        self.ups = [Upstream(Role.PREFILL, f"http://10.0.0.{i}:8000") for i in range(n)]
        self.pools = {Role.PREFILL: UpstreamPool(Role.PREFILL, self.ups), Role.DECODE: UpstreamPool(Role.DECODE)}
        self.detector = ConsecutiveFailureDetector(
            self.board, self.pools, eject_after=eject_after, base_time=base_time, max_time=max_time,
            max_share=max_share, return_on_expiry=return_on_expiry, clock=clock or self.clock,
        )

    def fail(self, upstream: Upstream, times: int, failure: str = "connect refused") -> None:
        for _ in range(times):
            self.detector.report(upstream, failure)

    def recover(self, upstream: Upstream) -> None:
        """What the active checker does once the ejection is over."""
        self.board.set(upstream, State.HEALTHY, "health probe ok")


# ---------------------------------------------------------------- counting


def test_ejects_after_exactly_eject_after_consecutive_failures() -> None:
    s = Setup(eject_after=3)
    u = s.ups[0]
    s.fail(u, 2)
    assert u.state is State.UNKNOWN
    assert s.transitions == []
    s.detector.report(u, "503 from upstream")
    assert u.state is State.EJECTED
    ((who, old, new, reason),) = s.transitions
    assert (who, old, new) == (u, State.UNKNOWN, State.EJECTED)
    assert "3 consecutive failures" in reason
    assert "503 from upstream" in reason
    assert s.ups[1].state is State.UNKNOWN


def test_eject_after_one() -> None:
    s = Setup(eject_after=1)
    s.fail(s.ups[0], 1)
    assert s.ups[0].state is State.EJECTED


def test_a_success_resets_the_count() -> None:
    s = Setup(eject_after=3)
    u = s.ups[0]
    s.fail(u, 2)
    s.detector.report(u, None)
    s.fail(u, 2)
    s.detector.report(u, None)
    s.fail(u, 2)
    assert u.state is State.UNKNOWN
    s.fail(u, 1)
    assert u.state is State.EJECTED


def test_counts_are_per_upstream() -> None:
    s = Setup(eject_after=2)
    a, b = s.ups
    s.fail(a, 1)
    s.fail(b, 1)
    assert (a.state, b.state) == (State.UNKNOWN, State.UNKNOWN)
    s.fail(a, 1)
    assert (a.state, b.state) == (State.EJECTED, State.UNKNOWN)


def test_success_for_an_unknown_upstream_is_fine() -> None:
    s = Setup()
    s.detector.report(s.ups[0], None)
    assert s.ups[0].state is State.UNKNOWN
    assert s.detector.ejection_over(s.ups[0])


@pytest.mark.parametrize("state", [s for s in State if s not in ROUTABLE_STATES and s is not State.EJECTED])
def test_only_routable_upstreams_are_ejected(state: State) -> None:
    s = Setup(eject_after=2)
    u = s.ups[0]
    u.state = state
    s.fail(u, 10)
    assert u.state is state
    assert s.transitions == []


def test_healthy_upstream_is_ejected() -> None:
    s = Setup(eject_after=2)
    u = s.ups[0]
    s.recover(u)
    s.fail(u, 2)
    assert s.transitions[-1][1:3] == (State.HEALTHY, State.EJECTED)


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    s = Setup(eject_after=2, base_time=1.0)
    u = s.ups[0]
    s.fail(u, 2)
    s.clock.now = 0.5
    s.fail(u, 10)
    s.clock.now = 1.0
    assert s.detector.ejection_over(u)
    assert len(s.transitions) == 1


# ---------------------------------------------------------------- ejection time


def test_ejection_over_at_the_boundary() -> None:
    s = Setup(eject_after=1, base_time=1.0)
    u = s.ups[0]
    s.clock.now = 10.0
    assert s.detector.ejection_over(u)  # never ejected
    s.fail(u, 1)
    assert not s.detector.ejection_over(u)
    s.clock.now = 10.999
    assert not s.detector.ejection_over(u)
    s.clock.now = 11.0
    assert s.detector.ejection_over(u)
    assert u.state is State.EJECTED  # return_on_expiry off: the state waits for the active checker


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    s = Setup(eject_after=2, base_time=1.0, max_time=3.0)
    u = s.ups[0]
    durations = []
    for start in (0.0, 10.0, 20.0, 30.0, 40.0):  # no success in between: the multiplier keeps growing
        s.clock.now = start
        if u.state is State.EJECTED:
            s.recover(u)
        s.fail(u, 2)
        assert u.state is State.EJECTED
        duration = 0.0
        while not s.detector.ejection_over(u):
            duration += 0.5
            s.clock.now = start + duration
        durations.append(duration)
    assert durations == [1.0, 2.0, 3.0, 3.0, 3.0]
    reasons = [reason for (_u, _old, new, reason) in s.transitions if new is State.EJECTED]
    assert [r.rsplit("ejected for ", 1)[1] for r in reasons] == ["1s", "2s", "3s", "3s", "3s"]


def test_ejection_time_exact_boundaries() -> None:
    s = Setup(eject_after=1, base_time=1.0, max_time=3.0)
    u = s.ups[0]
    s.fail(u, 1)  # 1st: [0, 1)
    s.clock.now = 0.999
    assert not s.detector.ejection_over(u)
    s.clock.now = 1.0
    assert s.detector.ejection_over(u)
    s.recover(u)
    s.clock.now = 2.0
    s.fail(u, 1)  # 2nd: [2, 4)
    s.clock.now = 3.999
    assert not s.detector.ejection_over(u)
    s.clock.now = 4.0
    assert s.detector.ejection_over(u)


def test_multiplier_resets_after_a_success_long_after_the_ejection() -> None:
    s = Setup(eject_after=1, base_time=1.0, max_time=3.0)
    u = s.ups[0]
    s.fail(u, 1)  # until 1
    s.recover(u)
    s.clock.now = 4.0  # == until + max_time: not yet "a long while"
    s.detector.report(u, None)
    s.fail(u, 1)  # 2nd ejection: 2s
    s.clock.now = 5.999
    assert not s.detector.ejection_over(u)
    s.clock.now = 6.0
    assert s.detector.ejection_over(u)
    s.recover(u)
    s.clock.now = 9.5  # > until (6) + max_time (3)
    s.detector.report(u, None)
    s.fail(u, 1)  # back to the base time
    s.clock.now = 10.499
    assert not s.detector.ejection_over(u)
    s.clock.now = 10.5
    assert s.detector.ejection_over(u)


def test_failures_alone_do_not_reset_the_multiplier() -> None:
    s = Setup(eject_after=1, base_time=1.0, max_time=5.0)
    u = s.ups[0]
    s.fail(u, 1)
    s.recover(u)
    s.clock.now = 100.0
    s.fail(u, 1)  # long after, but no success reported in between: 2nd ejection, 2s
    s.clock.now = 101.5
    assert not s.detector.ejection_over(u)


# ---------------------------------------------------------------- max share


def eject_all(s: Setup) -> list[State]:
    for u in s.ups:
        s.fail(u, 3)
    return [u.state for u in s.ups]


def test_max_share_half_of_four() -> None:
    s = Setup(4, eject_after=3, max_share=0.5)
    assert eject_all(s) == [State.EJECTED, State.EJECTED, State.UNKNOWN, State.UNKNOWN]


def test_max_share_half_of_three_is_one() -> None:
    s = Setup(3, eject_after=3, max_share=0.5)
    assert eject_all(s) == [State.EJECTED, State.UNKNOWN, State.UNKNOWN]


def test_the_only_upstream_of_a_pool_is_never_ejected() -> None:
    s = Setup(1, eject_after=3, max_share=1.0)
    s.fail(s.ups[0], 30)
    assert s.ups[0].state is State.UNKNOWN
    assert s.transitions == []


def test_the_last_healthy_member_is_kept_while_the_others_are_out() -> None:
    s = Setup(4, eject_after=1, max_share=1.0)
    a, b, c, d = s.ups
    s.fail(a, 1)
    b.state, c.state = State.UNHEALTHY, State.DRAINING  # out for other reasons
    s.fail(d, 5)
    assert [u.state for u in s.ups] == [State.EJECTED, State.UNHEALTHY, State.DRAINING, State.UNKNOWN]


def test_a_kept_member_is_ejected_once_another_is_healthy_again() -> None:
    s = Setup(2, eject_after=3, max_share=1.0)
    a, b = s.ups
    s.fail(a, 3)
    s.fail(b, 3)
    assert b.state is State.UNKNOWN  # a is out: b is the last one
    s.recover(a)
    s.fail(b, 1)  # its failures kept counting
    assert b.state is State.EJECTED
    assert "4 consecutive failures" in s.transitions[-1][3]


def test_keeping_the_last_member_is_logged_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    s = Setup(1, eject_after=2)
    u = s.ups[0]
    with caplog.at_level("WARNING", logger="pdproxy.outlier"):
        s.fail(u, 10)
        s.detector.report(u, None)  # the streak ends
        s.fail(u, 10)
    held = [r.getMessage() for r in caplog.records if "last healthy member" in r.getMessage()]
    assert held == ["prefill upstream http://10.0.0.0:8000: 2 consecutive failures, but it is the last healthy "
                    "member of its pool: not ejected"] * 2


def test_max_share_zero_still_allows_one() -> None:
    s = Setup(3, eject_after=1, max_share=0.0)
    assert eject_all(s) == [State.EJECTED, State.UNKNOWN, State.UNKNOWN]


def test_max_share_counts_only_the_upstreams_role() -> None:
    s = Setup(2, eject_after=1, max_share=0.5)
    d = [Upstream(Role.DECODE, f"http://10.0.1.{i}:8000") for i in range(2)]
    for upstream in d:
        s.pools[Role.DECODE].add(upstream)
    s.fail(s.ups[0], 1)
    s.fail(d[0], 1)  # the decode pool has its own budget
    assert [u.state for u in (*s.ups, *d)] == [State.EJECTED, State.UNKNOWN, State.EJECTED, State.UNKNOWN]


def test_blocked_upstream_is_ejected_once_room_frees_up() -> None:
    s = Setup(3, eject_after=3, max_share=0.5)
    a, b, _ = s.ups
    s.fail(a, 3)
    s.fail(b, 3)
    assert b.state is State.UNKNOWN
    s.recover(a)
    s.fail(b, 1)  # still failing, now there is room
    assert b.state is State.EJECTED
    assert "4 consecutive failures" in s.transitions[-1][3]


# ---------------------------------------------------------------- return on expiry (real loop timer)


async def test_return_on_expiry_brings_it_back_by_itself() -> None:
    s = Setup(eject_after=2, base_time=0.02, max_time=1.0, return_on_expiry=True, clock=time.monotonic)
    u = s.ups[0]
    s.fail(u, 2)
    assert u.state is State.EJECTED
    await s.board.wait_for(lambda: u.state is State.HEALTHY, timeout=1.0)
    assert s.detector.ejection_over(u)
    assert s.transitions[-1][1:] == (State.EJECTED, State.HEALTHY, "ejection time over")


async def test_without_return_on_expiry_it_stays_ejected() -> None:
    s = Setup(eject_after=2, base_time=0.02, max_time=1.0, return_on_expiry=False, clock=time.monotonic)
    u = s.ups[0]
    s.fail(u, 2)
    # A timer due after any the detector could have set: once it fires, theirs would have fired too.
    passed = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.03, passed.set_result, None)
    await passed
    assert s.detector.ejection_over(u)
    assert u.state is State.EJECTED


async def test_expiry_timer_does_not_return_it_before_the_clock_says_over() -> None:
    s = Setup(eject_after=1, base_time=0.02, max_time=1.0, return_on_expiry=True)  # fake clock
    u = s.ups[0]
    s.fail(u, 1)  # until 0.02 on the fake clock; a loop timer in 0.02 s
    passed = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.03, passed.set_result, None)
    await passed
    # The loop timer fired, but the (fake) clock says the ejection is not over: it must not return early.
    assert u.state is State.EJECTED


async def test_return_on_expiry_when_the_loop_timer_fires_before_the_clock_says_over() -> None:
    s = Setup(eject_after=1, base_time=0.02, max_time=1.0, return_on_expiry=True)  # fake clock at 0
    u = s.ups[0]
    s.fail(u, 1)  # until = 0.02 on the fake clock
    passed = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.02, passed.set_result, None)
    await passed  # the detector's timer has fired; the clock lags just behind it
    s.clock.now = 0.02  # now the ejection is over by the detector's own clock
    await s.board.wait_for(lambda: u.state is State.HEALTHY, timeout=0.2)


# ---------------------------------------------------------------- null object


def test_no_outlier_detection_does_nothing() -> None:
    detector = NoOutlierDetection()
    u = Upstream(Role.DECODE, "http://10.0.0.1:8000")
    for _ in range(100):
        detector.report(u, "connect refused")
    detector.report(u, None)
    assert u.state is State.UNKNOWN
    assert detector.ejection_over(u) is True
    u.state = State.EJECTED
    assert detector.ejection_over(u) is True


def test_forget_drops_a_removed_upstreams_record() -> None:
    s = Setup(2, eject_after=3)
    a = s.ups[0]
    s.fail(a, 2)
    s.detector.forget(a)
    s.fail(a, 2)  # counting starts again: 2 < 3
    assert a.state is State.UNKNOWN
    s.detector.forget(a)  # twice, or never known: harmless
    NoOutlierDetection().forget(a)
