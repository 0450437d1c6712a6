"""The reconciler: desired lists from a source become add / drain / remove calls on Membership."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pdproxy.discovery.base import SourceFailure, Target, Update, merge_targets
from pdproxy.discovery.reconciler import Reconciler
from pdproxy.health import StateBoard
from pdproxy.membership import Membership
from pdproxy.metrics import Metrics
from pdproxy.upstreams import Lease, Role, State, Upstream, UpstreamPool

P1, P2, P3 = "http://10.0.0.1:8100", "http://10.0.0.2:8100", "http://10.0.0.3:8100"
CONFIGURED = "http://10.0.9.9:8100"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def setup(clock: Clock, *, delay: float = 30.0, warmup: bool = True,
          state_file: Path | None = None) -> tuple[Reconciler, Membership, Metrics]:
    board = StateBoard()
    pools = {Role.PREFILL: UpstreamPool(Role.PREFILL, [Upstream(Role.PREFILL, CONFIGURED)]),
             Role.DECODE: UpstreamPool(Role.DECODE)}
    membership = Membership(pools, board, warmup=warmup, state_file=state_file)
    metrics = Metrics()
    reconciler = Reconciler(membership, "dns", removal_delay=delay, caps={Role.PREFILL: 7}, metrics=metrics,
                            clock=clock, wall_clock=lambda: 1234.5)
    return reconciler, membership, metrics


def prefill(*targets: Target) -> dict[Role, tuple[Target, ...]]:
    return {Role.PREFILL: tuple(targets)}


def urls(membership: Membership, role: Role = Role.PREFILL) -> list[str]:
    return [u.url for u in membership.pools[role].members]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_new_ready_targets_are_added_with_warmup_and_owned_by_the_source(clock: Clock) -> None:
    reconciler, membership, metrics = setup(clock)
    reconciler.apply(prefill(Target(P1), Target(P2, weight=3)))
    assert urls(membership) == [CONFIGURED, P1, P2]
    p1, p2 = membership.find(Role.PREFILL, P1), membership.find(Role.PREFILL, P2)
    assert p1 is not None and p2 is not None
    assert (p1.state, p1.source, p1.max_in_flight) == (State.WARMING, "dns", 7)
    assert p2.weight == 3
    assert sample(metrics, "pdproxy_discovery_changes_total", source="dns", action="add") == 2
    assert sample(metrics, "pdproxy_discovery_updates_total", source="dns") == 1
    assert sample(metrics, "pdproxy_discovery_last_success_timestamp_seconds", source="dns") == 1234.5


def test_without_health_checks_an_added_target_is_routable_at_once(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    upstream = membership.find(Role.PREFILL, P1)
    assert upstream is not None and upstream.routable


def test_a_target_first_seen_not_ready_is_not_added(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock)
    reconciler.apply(prefill(Target(P1, ready=False)))
    assert urls(membership) == [CONFIGURED]


def test_not_ready_drains_at_once_and_ready_again_undrains(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    upstream = membership.find(Role.PREFILL, P1)
    assert upstream is not None
    reconciler.apply(prefill(Target(P1, ready=False)))
    assert upstream.state is State.DRAINING
    assert urls(membership) == [CONFIGURED, P1]  # listed, only drained
    reconciler.apply(prefill(Target(P1)))
    assert upstream.state is State.UNKNOWN and upstream.routable


def test_an_operators_drain_is_not_lifted_by_discovery(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    upstream = membership.find(Role.PREFILL, P1)
    assert upstream is not None
    membership.set_drained(upstream, True)  # the admin API
    reconciler.apply(prefill(Target(P1)))
    assert upstream.state is State.DRAINING


def test_a_missing_member_stays_for_the_removal_delay_then_drains_and_goes(clock: Clock) -> None:
    reconciler, membership, metrics = setup(clock, delay=30, warmup=False)
    reconciler.apply(prefill(Target(P1), Target(P2)))
    p2 = membership.find(Role.PREFILL, P2)
    assert p2 is not None
    lease = Lease(p2)  # a request still on it
    reconciler.apply(prefill(Target(P1)))
    assert p2.state is State.UNKNOWN and reconciler.expire() == 30  # damped: still routable
    clock.now += 29.9
    reconciler.apply(prefill(Target(P1)))
    assert p2.routable
    clock.now += 0.1
    assert reconciler.expire() is None
    assert p2.state is State.DRAINING  # no new requests, the one on it runs on
    assert urls(membership) == [CONFIGURED, P1, P2]
    lease.release()
    assert membership.lease_released(p2)
    assert urls(membership) == [CONFIGURED, P1]
    assert p2.state is State.REMOVED
    assert sample(metrics, "pdproxy_discovery_changes_total", source="dns", action="remove") == 1


def test_a_flapping_record_is_damped(clock: Clock) -> None:
    reconciler, membership, metrics = setup(clock, delay=30, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    original = membership.find(Role.PREFILL, P1)
    for _ in range(5):  # gone for 20 s, back, gone again...
        reconciler.apply(prefill())
        clock.now += 20
        reconciler.apply(prefill(Target(P1)))
        clock.now += 20
    assert membership.find(Role.PREFILL, P1) is original and original is not None and original.routable
    assert sample(metrics, "pdproxy_discovery_changes_total", source="dns", action="remove") == 0


def test_zero_delay_removes_an_idle_member_at_once(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, delay=0, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    reconciler.apply(prefill())
    assert urls(membership) == [CONFIGURED]


def test_back_while_draining_is_taken_back(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, delay=0, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    upstream = membership.find(Role.PREFILL, P1)
    assert upstream is not None
    lease = Lease(upstream)
    reconciler.apply(prefill())
    assert upstream.state is State.DRAINING and membership.removing(upstream)
    reconciler.apply(prefill(Target(P1)))
    assert upstream.routable and not membership.removing(upstream)
    lease.release()
    assert not membership.lease_released(upstream)
    assert membership.find(Role.PREFILL, P1) is upstream


def test_configured_and_admin_members_are_never_touched(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, delay=0, warmup=False)
    admin_added, _ = membership.add(Role.PREFILL, P3, by="admin")
    reconciler.apply(prefill(Target(CONFIGURED, ready=False), Target(P3, weight=5, ready=False)))
    reconciler.apply(prefill())  # neither listed any more
    assert urls(membership) == [CONFIGURED, P3]
    assert admin_added.weight == 1 and admin_added.state is State.UNKNOWN
    assert admin_added.source == "admin"


def test_a_role_the_update_leaves_out_is_left_alone(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, delay=0, warmup=False)
    reconciler.apply({Role.DECODE: (Target(P1),)})
    reconciler.apply(prefill())
    assert urls(membership, Role.DECODE) == [P1]


def test_weight_changes_are_applied(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    reconciler.apply(prefill(Target(P1, weight=4)))
    upstream = membership.find(Role.PREFILL, P1)
    assert upstream is not None and upstream.weight == 4


def test_a_failure_changes_nothing_and_is_counted(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    reconciler, membership, metrics = setup(clock, delay=0, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    reconciler.apply(SourceFailure("DNS timeout"))
    assert urls(membership) == [CONFIGURED, P1]
    assert sample(metrics, "pdproxy_discovery_errors_total", source="dns") == 1
    assert "DNS timeout" in caplog.text and "keeping the last list" in caplog.text


def test_an_operator_removal_ends_the_pending_removal(clock: Clock) -> None:
    reconciler, membership, _ = setup(clock, delay=30, warmup=False)
    reconciler.apply(prefill(Target(P1)))
    upstream = membership.find(Role.PREFILL, P1)
    assert upstream is not None
    reconciler.apply(prefill())
    assert membership.remove(upstream)
    clock.now += 60
    assert reconciler.expire() is None
    assert urls(membership) == [CONFIGURED]


async def test_discovered_members_stay_out_of_the_state_file(clock: Clock, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    reconciler, membership, _ = setup(clock, warmup=False, state_file=state)
    reconciler.apply(prefill(Target(P1)))
    await membership.flush()
    saved = json.loads(state.read_text())
    assert [u["url"] for u in saved["upstreams"]] == [CONFIGURED]


def test_merge_targets_keeps_one_per_url() -> None:
    merged = merge_targets([Target(P2, 1, False), Target(P1, 2), Target(P2, 3, True), Target(P1, 1)])
    assert merged == (Target(P1, 2), Target(P2, 3, True))


class ScriptedSource:
    """Yields the given updates, then waits to be cancelled (as a real source does)."""

    name = "dns"

    def __init__(self, *updates: Update) -> None:
        self.script = updates
        self.closed = asyncio.Event()

    async def updates(self) -> AsyncIterator[Update]:
        try:
            for update in self.script:
                yield update
            await asyncio.Event().wait()
        finally:
            self.closed.set()


async def test_run_removes_on_time_without_another_update() -> None:
    board = StateBoard()
    pools = {Role.PREFILL: UpstreamPool(Role.PREFILL), Role.DECODE: UpstreamPool(Role.DECODE)}
    membership = Membership(pools, board, warmup=False)
    reconciler = Reconciler(membership, "dns", removal_delay=0.1, caps={})
    source = ScriptedSource(prefill(Target(P1), Target(P2)), prefill(Target(P1)))
    task = asyncio.ensure_future(reconciler.run(source))
    try:
        await board.wait_for(lambda: urls(membership) == [P1], timeout=2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(source.closed.wait(), 1)  # the source's generator was closed with the task


class CrashingSource:
    name = "file"

    def __init__(self) -> None:
        self.calls = 0

    async def updates(self) -> AsyncIterator[Update]:
        self.calls += 1
        raise RuntimeError("bug in a source")
        yield  # pragma: no cover


async def test_a_crashing_source_is_an_error_not_the_end(caplog: pytest.LogCaptureFixture) -> None:
    board = StateBoard()
    pools = {Role.PREFILL: UpstreamPool(Role.PREFILL), Role.DECODE: UpstreamPool(Role.DECODE)}
    metrics = Metrics()
    reconciler = Reconciler(Membership(pools, board, warmup=False), "file", removal_delay=0, caps={},
                            metrics=metrics)
    task = asyncio.ensure_future(reconciler.run(CrashingSource()))
    try:
        for _ in range(100):
            if sample(metrics, "pdproxy_discovery_errors_total", source="file"):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sample(metrics, "pdproxy_discovery_errors_total", source="file") == 1
    assert "bug in a source" in caplog.text
