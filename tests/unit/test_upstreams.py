"""Upstreams, leases and pools: URL normalization, caps, routability, immutable membership snapshots."""

from __future__ import annotations

import logging

import pytest

from pdproxy.upstreams import ROUTABLE_STATES, Lease, Role, State, Upstream, UpstreamPool, normalize_url


def up(n: int = 1, *, role: Role = Role.PREFILL, **kwargs: object) -> Upstream:
    return Upstream(role, f"http://10.0.0.{n}:8000", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- normalize_url


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:8000", "http://10.0.0.1:8000"),
        ("localhost:8100", "http://localhost:8100"),
        ("http://10.0.0.1:8000", "http://10.0.0.1:8000"),
        ("http://10.0.0.1:8000/", "http://10.0.0.1:8000"),
        ("https://p0.example:443", "https://p0.example:443"),
        ("HTTPS://P0.Example:8443", "https://p0.example:8443"),
        ("  10.0.0.1:8000\n", "http://10.0.0.1:8000"),
        ("[::1]:80", "http://[::1]:80"),
        ("http://[::1]:80/", "http://[::1]:80"),
        ("https://[2001:db8::7]:9000", "https://[2001:db8::7]:9000"),
        ("h:1", "http://h:1"),
        ("h:65535", "http://h:65535"),
    ],
)
def test_normalize_url_accepts(address: str, expected: str) -> None:
    assert normalize_url(address) == expected


def test_normalize_url_is_idempotent() -> None:
    for address in ("10.0.0.1:8000", "[::1]:80", "https://h:1/"):
        once = normalize_url(address)
        assert normalize_url(once) == once


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ftp://h:21", "scheme"),
        ("grpc://h:50051", "scheme"),
        ("http://h:8000/v1", "only scheme://host:port"),
        ("h:8000/v1/completions", "only scheme://host:port"),
        ("http://h:8000?x=1", "only scheme://host:port"),
        ("http://h:8000#frag", "only scheme://host:port"),
        ("http://user:secret@h:8000", "only scheme://host:port"),
        ("http://user@h:8000", "only scheme://host:port"),
        ("user:secret@h:8000", "only scheme://host:port"),
        ("h", "missing port"),
        ("http://h", "missing port"),
        ("https://h/", "missing port"),
        ("[::1]", "missing port"),
        ("http://:8000", "missing host"),
        ("h:0", "1-65535"),
        ("h:65536", "1-65535"),
        ("h:99999", "1-65535"),
        ("h:http", "1-65535"),
    ],
)
def test_normalize_url_rejects(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_url(address)


def test_normalize_url_error_names_the_address() -> None:
    with pytest.raises(ValueError, match="ftp://h:21"):
        normalize_url("ftp://h:21")


LONGEST_NAME = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://vllm-prefill-0.vllm.svc.cluster.local:8100", "http://vllm-prefill-0.vllm.svc.cluster.local:8100"),
        ("prefill_0:8100", "http://prefill_0:8100"),  # Docker Compose service names
        ("p0.example.:8100", "http://p0.example.:8100"),  # fully qualified
        ("http://b\u00fccher.example:80", "http://xn--bcher-kva.example:80"),  # IDNA: its ASCII form
        ("[::ffff:10.0.0.1]:80", "http://[::ffff:a00:1]:80"),
        ("[fe80::1%eth0]:80", "http://[fe80::1%eth0]:80"),
        ("1host:80", "http://1host:80"),
        ("a" * 63 + ".b:80", "http://" + "a" * 63 + ".b:80"),
        (LONGEST_NAME + ":80", f"http://{LONGEST_NAME}:80"),
    ],
)
def test_normalize_url_accepts_dns_names_and_ip_literals(address: str, expected: str) -> None:
    assert normalize_url(address) == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("http://a b:9", "IP address or a DNS name"),
        ("http://%00:9", "IP address or a DNS name"),
        ("http://a\x00b:9", "IP address or a DNS name"),
        ("http://" + "a" * 10_000 + ":9", "at most 253 characters"),
        (".".join(["a" * 63] * 4) + ":80", "at most 253 characters"),
        ("a" * 64 + ".b:80", "at most 63 characters"),
        ("-a:80", "IP address or a DNS name"),
        ("a-:80", "IP address or a DNS name"),
        ("a..b:80", "IP address or a DNS name"),
        ("h*st:80", "IP address or a DNS name"),
        ("999.0.0.1:80", "not a valid IPv4 address"),
        ("10.1:80", "not a valid IPv4 address"),
        ("[::g]:80", "IP address or a DNS name"),
    ],
)
def test_normalize_url_rejects_bad_hosts(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_url(address)


# ---------------------------------------------------------------- Upstream


def test_upstream_defaults() -> None:
    u = up()
    assert (u.weight, u.max_in_flight, u.state, u.in_flight, u.served, u.last_error) == (
        1, 0, State.UNKNOWN, 0, 0, None)
    assert u.routable


def test_describe_is_a_json_ready_view() -> None:
    u = up(3, role=Role.DECODE, weight=2, max_in_flight=4, state=State.EJECTED)
    Lease(u)
    u.last_error = "GET /health answered 503"
    view = u.describe()
    assert view == {
        "id": u.id, "role": "decode", "url": "http://10.0.0.3:8000", "weight": 2, "max_in_flight": 4,
        "state": "ejected", "in_flight": 1, "served": 0, "last_error": "GET /health answered 503",
        "source": "config", "models": [],
        "meta": {}, "meta_error": None,
    }
    assert all(type(value) in (str, int, dict, list, type(None)) for value in view.values())  # plain values, no enums


def test_upstreams_have_distinct_ids_and_identity_equality() -> None:
    a, b = up(1), up(1)
    assert a.id != b.id
    assert a != b  # same role and url, still two upstreams
    assert a == a


def test_no_cap_is_never_full() -> None:
    u = up(max_in_flight=0)
    u.in_flight = 10_000
    assert not u.full


@pytest.mark.parametrize(("cap", "in_flight", "full"), [(1, 0, False), (1, 1, True), (3, 2, False), (3, 3, True),
                                                        (3, 4, True)])
def test_cap_is_full_at_max_in_flight(cap: int, in_flight: int, full: bool) -> None:
    u = up(max_in_flight=cap)
    u.in_flight = in_flight
    assert u.full is full


@pytest.mark.parametrize("state", list(State))
def test_routable_per_state(state: State) -> None:
    assert up(state=state).routable is (state in (State.UNKNOWN, State.HEALTHY))


def test_warming_and_removed_are_not_routable() -> None:
    assert not up(state=State.WARMING).routable
    assert not up(state=State.REMOVED).routable


def test_routable_states_constant() -> None:
    assert frozenset({State.UNKNOWN, State.HEALTHY}) == ROUTABLE_STATES


# ---------------------------------------------------------------- Lease


def test_lease_counts_in_flight_and_served() -> None:
    u = up()
    first, second = Lease(u), Lease(u)
    assert (u.in_flight, u.served) == (2, 0)
    first.release()
    assert (u.in_flight, u.served) == (1, 1)
    second.release()
    assert (u.in_flight, u.served) == (0, 2)
    assert first.upstream is u


def test_lease_release_is_idempotent_and_calls_on_release_once() -> None:
    u = up()
    calls: list[tuple[Upstream, int]] = []
    lease = Lease(u, on_release=lambda released: calls.append((released, released.in_flight)))
    for _ in range(3):
        lease.release()
    assert (u.in_flight, u.served) == (0, 1)
    assert calls == [(u, 0)]  # called once, with the upstream, after the slot was given back


def test_lease_makes_capped_upstream_full_until_released() -> None:
    u = up(max_in_flight=1)
    lease = Lease(u)
    assert u.full
    lease.release()
    assert not u.full


# ---------------------------------------------------------------- UpstreamPool


def test_available_skips_unroutable_full_and_excluded() -> None:
    healthy, unknown, unhealthy, ejected, draining, full, excluded = (
        up(1, state=State.HEALTHY), up(2), up(3, state=State.UNHEALTHY), up(4, state=State.EJECTED),
        up(5, state=State.DRAINING), up(6, state=State.HEALTHY, max_in_flight=1), up(7, state=State.HEALTHY))
    warming = up(8, state=State.WARMING)
    pool = UpstreamPool(Role.PREFILL, [healthy, unknown, unhealthy, ejected, draining, full, excluded, warming])
    Lease(full)
    assert pool.available(exclude={excluded}) == [healthy, unknown]
    assert pool.available() == [healthy, unknown, excluded]
    assert pool.available(exclude=[healthy, unknown, excluded]) == []


def test_available_excludes_by_identity_not_url() -> None:
    a, twin = up(1), up(1)
    pool = UpstreamPool(Role.PREFILL, [a, twin])
    assert pool.available(exclude=[a]) == [twin]


def test_available_sees_cap_freed_by_release() -> None:
    u = up(max_in_flight=1)
    pool = UpstreamPool(Role.DECODE, [u])
    lease = Lease(u)
    assert pool.available() == []
    lease.release()
    assert pool.available() == [u]


def test_routable_keeps_full_upstreams() -> None:
    full, unhealthy = up(1, max_in_flight=1), up(2, state=State.UNHEALTHY)
    pool = UpstreamPool(Role.PREFILL, [full, unhealthy])
    Lease(full)
    assert pool.routable() == (full,)


def test_empty_pool() -> None:
    pool = UpstreamPool(Role.DECODE)
    assert pool.members == ()
    assert pool.routable() == ()
    assert pool.available() == []
    assert pool.find("http://10.0.0.1:8000") is None
    assert pool.total_in_flight() == 0


def test_add_and_remove_swap_the_snapshot() -> None:
    a, b, c = up(1), up(2), up(3)
    pool = UpstreamPool(Role.PREFILL, [a, b])
    before = pool.members
    assert isinstance(before, tuple)
    pool.add(c)
    after_add = pool.members
    assert before == (a, b)  # a reader's snapshot does not move under it
    assert after_add == (a, b, c)
    assert after_add is not before
    pool.remove(a)
    assert pool.members == (b, c)
    assert after_add == (a, b, c)
    assert isinstance(pool.members, tuple)


def test_remove_by_identity_and_missing_is_harmless() -> None:
    a, twin = up(1), up(1)
    pool = UpstreamPool(Role.PREFILL, [a, twin])
    pool.remove(twin)
    assert pool.members == (a,)
    pool.remove(twin)
    assert pool.members == (a,)


def test_find_by_url() -> None:
    a, b = up(1), up(2)
    pool = UpstreamPool(Role.PREFILL, [a, b])
    assert pool.find("http://10.0.0.2:8000") is b
    assert pool.find("http://10.0.0.9:8000") is None
    pool.remove(b)
    assert pool.find("http://10.0.0.2:8000") is None


def test_total_in_flight() -> None:
    a, b = up(1), up(2)
    pool = UpstreamPool(Role.PREFILL, [a, b])
    leases = [Lease(a), Lease(a), Lease(b)]
    assert pool.total_in_flight() == 3
    for lease in leases:
        lease.release()
    assert pool.total_in_flight() == 0


# ---------------------------------------------------------------- healthy panic


def pool_of(*states: State, threshold: float = 0.5) -> UpstreamPool:
    return UpstreamPool(Role.DECODE, [up(i, role=Role.DECODE, state=state) for i, state in enumerate(states)],
                        panic_threshold=threshold)


def test_at_the_threshold_the_pool_is_not_in_panic() -> None:
    pool = pool_of(State.HEALTHY, State.UNHEALTHY)  # 1 of 2 = 50%: not under 50%
    assert not pool.check_panic()
    assert pool.routable() == pool.healthy() == pool.members[:1]


def test_under_the_threshold_every_member_in_service_is_routable() -> None:
    pool = pool_of(State.HEALTHY, State.UNHEALTHY, State.EJECTED, State.DRAINING, State.WARMING, State.UNKNOWN)
    # in service: healthy, unhealthy, ejected, unknown; healthy among them: 2 of 4 = 50% -> not in panic
    assert not pool.check_panic()
    pool.members[5].state = State.EJECTED  # 1 of 4
    assert pool.check_panic()
    assert [u.state for u in pool.routable()] == [State.HEALTHY, State.UNHEALTHY, State.EJECTED, State.EJECTED]
    assert pool.healthy() == pool.members[:1]


def test_panic_with_no_healthy_member_routes_to_all_in_service() -> None:
    pool = pool_of(State.EJECTED)
    assert pool.routable() == pool.members
    assert pool.available() == list(pool.members)
    assert pool.healthy() == ()


def test_panic_keeps_caps_and_exclusions() -> None:
    pool = pool_of(State.UNHEALTHY, State.EJECTED, State.UNHEALTHY)
    full, excluded, free = pool.members
    full.max_in_flight = 1
    Lease(full)
    assert pool.available(exclude=[excluded]) == [free]


def test_panic_never_routes_to_drained_warming_or_removed_members() -> None:
    pool = pool_of(State.DRAINING, State.WARMING, State.REMOVED)
    assert not pool.check_panic()  # nothing in service: no panic, nothing routable
    assert pool.routable() == ()


def test_threshold_zero_turns_panic_off() -> None:
    pool = pool_of(State.EJECTED, State.UNHEALTHY, threshold=0.0)
    assert not pool.check_panic()
    assert pool.routable() == ()


def test_threshold_one_panics_as_soon_as_one_member_is_out() -> None:
    pool = pool_of(State.HEALTHY, State.HEALTHY, State.UNHEALTHY, threshold=1.0)
    assert pool.check_panic()
    assert len(pool.routable()) == 3


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_out_of_range_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="0 to 1"):
        UpstreamPool(Role.DECODE, panic_threshold=threshold)


def test_entering_and_leaving_panic_is_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    pool = pool_of(State.HEALTHY, State.HEALTHY)
    with caplog.at_level(logging.INFO, logger="pdproxy.upstreams"):
        pool.routable()
        pool.members[0].state = State.EJECTED
        pool.members[1].state = State.UNHEALTHY
        for _ in range(5):
            pool.available()
            assert pool.check_panic()
        pool.members[0].state = State.HEALTHY
        for _ in range(5):
            pool.routable()
    assert [r.getMessage() for r in caplog.records] == [
        "decode pool in panic: 0 of 2 members in service are healthy (under 50%): routing to all of them",
        "decode pool out of panic: 1 of 2 members in service are healthy",
    ]


def test_may_route_follows_panic_for_a_choice_made_earlier() -> None:
    pool = pool_of(State.HEALTHY, State.UNHEALTHY, State.DRAINING)
    healthy, unhealthy, drained = pool.members
    assert pool.may_route(healthy) and not pool.may_route(unhealthy) and not pool.may_route(drained)
    healthy.state = State.EJECTED  # 0 of 2 in service healthy: panic
    assert pool.may_route(unhealthy) and pool.may_route(healthy) and not pool.may_route(drained)
    assert not pool.may_route(up(9, role=Role.DECODE, state=State.UNHEALTHY))  # not a member


def test_panic_never_routes_to_an_upstream_without_its_handoff_metadata() -> None:
    """Panic overrides health, not missing metadata: no plan can be built for such a server."""
    ready = Upstream(Role.PREFILL, "http://p1:8100", state=State.UNHEALTHY)
    pending = Upstream(Role.PREFILL, "http://p2:8100", state=State.HEALTHY)
    pending.meta_error = "handoff metadata not discovered yet"
    pool = UpstreamPool(Role.PREFILL, [ready, pending], panic_threshold=0.9)
    assert pool.check_panic()  # none of the two is routable on its own
    assert pool.routable() == (ready,)
    assert pool.may_route(ready) and not pool.may_route(pending)
