"""Membership: the per-role cap, and a pool's panic re-checked on every state change."""

from __future__ import annotations

import logging

import pytest

from pdproxy.health import StateBoard
from pdproxy.membership import Membership, MembershipFull
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool


def membership(n: int = 1, *, cap: int = 3, threshold: float = 0.0) -> tuple[Membership, StateBoard]:
    board = StateBoard()
    pools = {role: UpstreamPool(role, [Upstream(role, f"http://10.0.{i}.{j}:8000") for j in range(n)],
                                panic_threshold=threshold) for i, role in enumerate(Role)}
    return Membership(pools, board, warmup=False, max_per_role=cap), board


def pool_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pdproxy.upstreams"]


def test_a_full_pool_refuses_a_new_upstream_and_changes_nothing() -> None:
    m, _ = membership(1, cap=2)
    assert m.room(Role.PREFILL) == 1
    m.add(Role.PREFILL, "http://10.1.0.1:8000")
    assert m.room(Role.PREFILL) == 0
    with pytest.raises(MembershipFull, match="already has 2 upstreams"):
        m.add(Role.PREFILL, "http://10.1.0.2:8000")
    assert len(m.pools[Role.PREFILL].members) == 2
    upstream, created = m.add(Role.PREFILL, "http://10.1.0.1:8000", weight=3)  # re-adding is no new member
    assert (created, upstream.weight) == (False, 3)
    assert m.room(Role.DECODE) == 1  # each role has its own room


def test_panic_is_logged_when_a_state_changes_not_at_the_next_request(caplog: pytest.LogCaptureFixture) -> None:
    m, board = membership(2, threshold=0.5)
    decode = m.pools[Role.DECODE].members
    with caplog.at_level(logging.INFO, logger="pdproxy.upstreams"):
        board.set(decode[0], State.EJECTED, "test")
        assert pool_lines(caplog) == []  # 1 of 2 is not under 50%
        board.set(decode[1], State.UNHEALTHY, "test")
        assert pool_lines(caplog) == ["decode pool in panic: 0 of 2 members in service are healthy (under 50%): "
                                   "routing to all of them"]
        board.set(decode[0], State.HEALTHY, "test")
    assert pool_lines(caplog)[-1] == "decode pool out of panic: 1 of 2 members in service are healthy"


async def test_adding_a_healthy_member_ends_a_panic(caplog: pytest.LogCaptureFixture) -> None:
    m, board = membership(1, threshold=0.5)
    board.set(m.pools[Role.DECODE].members[0], State.UNHEALTHY, "test")
    assert m.pools[Role.DECODE].check_panic()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pdproxy.upstreams"):
        m.add(Role.DECODE, "http://10.1.0.1:8000")  # unknown: routable, so 1 of 2 healthy
    assert pool_lines(caplog) == ["decode pool out of panic: 1 of 2 members in service are healthy"]
