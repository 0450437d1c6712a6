"""The last healthy member of a pool is never ejected, and a pool with too few healthy members
routes to all of them (healthy panic): real mock engines behind a real proxy on loopback."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory

PROMPT = {"model": "mock", "prompt": "hello there", "max_tokens": 4}
FAST_HEALTH = {"health_interval": 0.05, "health_timeout": 0.5, "health_rise": 1, "health_fall": 1}


async def complete(http: aiohttp.ClientSession, cluster: Cluster) -> int:
    async with http.post(cluster.url + "/v1/completions", json=PROMPT) as resp:
        await resp.read()
        return resp.status


async def test_one_decode_server_failing_three_times_is_not_ejected_and_keeps_serving(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await cluster_factory(n_prefill=1, n_decode=1, eject_after=3, flow_retries=1)
    decode_url = cluster.decode_urls[0]
    cluster.decode[0].fail_next(500, times=3)
    with caplog.at_level(logging.WARNING, logger="pdproxy.outlier"):
        statuses = [await complete(http, cluster) for _ in range(4)]
    # 1st: a 500, rerun on the same (only) D, a 500 again -> 502. 2nd: the 3rd 500 in a row, rerun -> 200.
    assert statuses == [502, 200, 200, 200]
    assert cluster.upstream(decode_url).state is State.UNKNOWN
    assert cluster.metric("pdproxy_upstream_ejections_total", role="decode", upstream=decode_url) == 0
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=decode_url,
                          outcome="bad_status") == 3
    held = [r.getMessage() for r in caplog.records if "last healthy member" in r.getMessage()]
    assert held == [f"decode upstream {decode_url}: 3 consecutive failures, but it is the last healthy member "
                    "of its pool: not ejected"]


async def test_two_of_three_prefill_servers_failing_probes_puts_the_pool_in_panic(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await cluster_factory(n_prefill=3, n_decode=1, prefill_policy="round_robin",
                                    healthy_panic_threshold=0.5, **FAST_HEALTH)
    for url in cluster.prefill_urls:
        await cluster.wait_state(url, State.HEALTHY)
    assert cluster.metric("pdproxy_pool_panic", role="prefill") == 0
    with caplog.at_level(logging.INFO, logger="pdproxy.upstreams"):
        for engine in cluster.prefill[1:]:  # their /health fails, but they still serve (an overloaded fleet)
            engine.healthy = False
        for url in cluster.prefill_urls[1:]:
            await cluster.wait_state(url, State.UNHEALTHY)
        assert cluster.metric("pdproxy_pool_panic", role="prefill") == 1
        served = [len(engine.requests) for engine in cluster.prefill]
        assert [await complete(http, cluster) for _ in range(6)] == [200] * 6
        assert [len(e.requests) - before for e, before in zip(cluster.prefill, served, strict=True)] == [2, 2, 2]
        cluster.prefill[1].healthy = True  # 2 of 3 healthy: out of panic, the unhealthy one gets nothing
        await cluster.wait_state(cluster.prefill_urls[1], State.HEALTHY)
        assert cluster.metric("pdproxy_pool_panic", role="prefill") == 0
        served = [len(engine.requests) for engine in cluster.prefill]
        assert [await complete(http, cluster) for _ in range(4)] == [200] * 4
        assert [len(e.requests) - before for e, before in zip(cluster.prefill, served, strict=True)] == [2, 2, 0]
    panic_lines = [r.getMessage() for r in caplog.records if r.name == "pdproxy.upstreams"]
    assert panic_lines == [
        "prefill pool in panic: 1 of 3 members in service are healthy (under 50%): routing to all of them",
        "prefill pool out of panic: 2 of 3 members in service are healthy",
    ]


async def test_without_a_threshold_unhealthy_members_get_nothing(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(n_prefill=3, n_decode=1, prefill_policy="round_robin",
                                    healthy_panic_threshold=0, **FAST_HEALTH)
    for engine in cluster.prefill[1:]:
        engine.healthy = False
    for url in cluster.prefill_urls[1:]:
        await cluster.wait_state(url, State.UNHEALTHY)
    assert [await complete(http, cluster) for _ in range(4)] == [200] * 4
    assert [len(e.requests) for e in cluster.prefill[1:]] == [0, 0]
    assert cluster.metric("pdproxy_pool_panic", role="prefill") == 0


async def test_in_panic_the_decode_server_admitted_is_kept_after_the_prefill(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    """The D chosen at admission is checked again after P answers (pool.may_route): in panic an
    unhealthy D is still routable, so it is kept and the load spreads over all three."""
    cluster = await cluster_factory(n_prefill=1, n_decode=3, decode_policy="round_robin",
                                    healthy_panic_threshold=0.5, **FAST_HEALTH)
    for engine in cluster.decode[1:]:
        engine.healthy = False
    for url in cluster.decode_urls[1:]:
        await cluster.wait_state(url, State.UNHEALTHY)
    assert cluster.metric("pdproxy_pool_panic", role="decode") == 1
    assert [await complete(http, cluster) for _ in range(6)] == [200] * 6
    assert [len(engine.requests) for engine in cluster.decode] == [2, 2, 2]
