"""Hedged prefill against real mock engines: a P that stops answering costs its requests a hedge delay,
not a prefill timeout, and is never blamed for the attempts the hedge cancelled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory

BODY = {"model": "mock", "prompt": "hello there", "max_tokens": 4, "stream": True}
FAST_HEDGE = {"prefill_hedge_floor": 0.05, "prefill_timeout": 1.5, "prefill_policy": "round_robin"}


async def send(http: aiohttp.ClientSession, cluster: Cluster, body: dict[str, Any] = BODY) -> tuple[int, bytes]:
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.read()


async def hang_both_and_send(http: aiohttp.ClientSession, cluster: Cluster) -> tuple[asyncio.Task[Any], int, int]:
    """Both P stop answering and one request goes out: (its task, the P of its first attempt, the other P)."""
    for engine in cluster.prefill:
        engine.stop_answering()
    request = asyncio.create_task(send(http, cluster))
    hung = await cluster.wait_any_prefill(1)
    return request, hung, 1 - hung


async def only_the_first_p_hangs(http: aiohttp.ClientSession, cluster: Cluster) -> tuple[int, int]:
    """The P of the request's first attempt stays hung, the other answers: (the answer's status, the hung P)."""
    request, hung, other = await hang_both_and_send(http, cluster)
    cluster.prefill[other].resume_answering()
    status, _ = await asyncio.wait_for(request, 2)
    return status, hung


async def until(check: Callable[[], bool], timeout: float = 1.0) -> None:
    """Yield to the loop until `check()` holds (proxy counters have no event to wait on), within `timeout`."""
    async def poll() -> None:
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def hedges(cluster: Cluster, result: str) -> float:
    return cluster.metric("pdproxy_prefill_hedges_total", result=result)


def outcome(cluster: Cluster, index: int, name: str) -> float:
    return cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=cluster.prefill_urls[index],
                          outcome=name)


async def test_hung_prefill_is_hedged_and_the_hedge_wins(cluster_factory: ClusterFactory,
                                                         http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(**FAST_HEDGE)
    started = time.perf_counter()
    request, hung, other = await hang_both_and_send(http, cluster)
    cluster.prefill[other].resume_answering()
    status, payload = await asyncio.wait_for(request, 2)
    assert status == 200 and payload.endswith(b"data: [DONE]\n\n"), payload
    assert time.perf_counter() - started < 1.0  # well under the 1.5 s prefill timeout
    assert hedges(cluster, "won") == 1
    assert outcome(cluster, hung, "hedged") == 1  # cancelled by the hedge: reported, never held against it
    assert outcome(cluster, hung, "timeout") == 0
    assert cluster.upstream(cluster.prefill_urls[hung]).last_error is None
    assert cluster.upstream(cluster.prefill_urls[hung]).state is not State.EJECTED
    assert outcome(cluster, other, "ok") == 1
    assert cluster.metric("pdproxy_prefill_retries_total") == 0  # a hedge is not a retry
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1  # D got the winner's handle
    hung_engine = cluster.prefill[hung]
    await hung_engine.wait_until(lambda _: hung_engine.handlers_running == 0)  # its handler was cancelled
    cluster.prefill[hung].resume_answering()


async def test_first_attempt_answering_first_cancels_the_hedge(cluster_factory: ClusterFactory,
                                                               http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(**FAST_HEDGE)
    request, first, other = await hang_both_and_send(http, cluster)
    await cluster.prefill[other].wait_for_requests(1)  # the hedge is out
    cluster.prefill[first].resume_answering()
    status, _ = await asyncio.wait_for(request, 2)
    assert status == 200
    assert hedges(cluster, "lost") == 1 and hedges(cluster, "won") == 0
    assert outcome(cluster, first, "ok") == 1
    assert outcome(cluster, other, "hedged") == 1
    assert cluster.upstream(cluster.prefill_urls[other]).last_error is None
    cluster.prefill[other].resume_answering()


async def test_no_hedge_when_prefills_answer_in_time(cluster_factory: ClusterFactory,
                                                     http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(prefill_hedge_floor=0.5, prefill_policy="round_robin")
    for _ in range(6):
        status, _ = await send(http, cluster)
        assert status == 200
    assert sum(hedges(cluster, result) for result in ("won", "lost", "failed", "cancelled", "over_budget",
                                                      "no_upstream")) == 0
    learned = [cluster.flow.prefill.hedging.per_token(url) for url in cluster.prefill_urls]
    assert all(value is not None and value > 0 for value in learned), learned
    assert sum(len(e.requests) for e in cluster.prefill) == 6  # one prefill per request


async def test_hedge_delay_follows_the_learned_per_token_time(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    """A P observed at ~30 ms for this prompt is hedged after multiple x 30 ms, not after the 1 s floor's
    worth of a timeout: the deadline comes from what this prompt should take on this server."""
    from pdproxy.mock import MockConfig

    cluster = await cluster_factory(n_prefill=2, prefill_config=MockConfig(role="prefill", ttft_ms=30),
                                    prefill_hedge_floor=0.01, prefill_hedge_multiple=4, prefill_timeout=1.5,
                                    prefill_policy="round_robin")
    for _ in range(4):  # both P observed
        assert (await send(http, cluster))[0] == 200
    request, hung, other = await hang_both_and_send(http, cluster)
    started = time.perf_counter()
    cluster.prefill[other].resume_answering()
    status, _ = await asyncio.wait_for(request, 2)
    assert status == 200
    assert time.perf_counter() - started < 0.6  # ~4 x 30 ms, then the hedge's own ~30 ms
    assert hedges(cluster, "won") == 1
    cluster.prefill[hung].resume_answering()


async def test_over_budget_the_attempt_waits_for_its_own_timeout_and_is_blamed(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(prefill_hedge_budget=0.1, prefill_hedge_min=0, prefill_hedge_floor=0.05,
                                    prefill_timeout=0.3, prefill_policy="round_robin", eject_after=0)
    status, hung = await only_the_first_p_hangs(http, cluster)
    assert status == 200  # failed over after the timeout
    assert hedges(cluster, "over_budget") == 1 and hedges(cluster, "won") == 0
    assert outcome(cluster, hung, "timeout") == 1  # its own attempt timed out: its silence is its fault
    assert cluster.metric("pdproxy_prefill_retries_total") == 1
    cluster.prefill[hung].resume_answering()


async def test_hedge_failing_leaves_the_first_attempt_running(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(**FAST_HEDGE, eject_after=0)
    request, first, other = await hang_both_and_send(http, cluster)
    cluster.prefill[other].fail_next(500)
    cluster.prefill[other].resume_answering()
    await until(lambda: hedges(cluster, "failed") == 1)
    assert not request.done()
    cluster.prefill[first].resume_answering()  # the first attempt answers after all
    status, _ = await asyncio.wait_for(request, 2)
    assert status == 200
    assert outcome(cluster, first, "ok") == 1
    assert outcome(cluster, other, "bad_status") == 1


async def test_client_leaving_cancels_both_attempts(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(**FAST_HEDGE)
    async with aiohttp.ClientSession() as http:
        request, first, other = await hang_both_and_send(http, cluster)
        await cluster.prefill[other].wait_for_requests(1)  # the hedge is out
        request.cancel()
    await asyncio.wait_for(cluster.flow.wait_idle(), 2)
    assert hedges(cluster, "cancelled") == 1
    for index in (first, other):
        assert outcome(cluster, index, "cancelled") == 1
        assert cluster.upstream(cluster.prefill_urls[index]).last_error is None
    for engine in cluster.prefill:
        engine.resume_answering()


async def test_hedge_with_no_other_prefill_server(cluster_factory: ClusterFactory,
                                                  http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1, prefill_hedge_floor=0.05, prefill_timeout=1.5, eject_after=0)
    cluster.prefill[0].stop_answering()
    request = asyncio.create_task(send(http, cluster))
    await until(lambda: hedges(cluster, "no_upstream") == 1)
    cluster.prefill[0].resume_answering()
    status, _ = await asyncio.wait_for(request, 2)
    assert status == 200


async def test_a_hedge_over_budget_is_sent_once_the_budget_frees(cluster_factory: ClusterFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=3, prefill_hedge_min=1, prefill_hedge_budget=0.1,
                                    prefill_hedge_floor=0.05, prefill_timeout=1.5, prefill_policy="round_robin")
    hedging = cluster.flow.prefill.hedging
    for engine in cluster.prefill:
        engine.stop_answering()
    first = asyncio.create_task(send(http, cluster))
    await until(lambda: hedging.active == 1)  # the first request's hedge is out (and hangs too)
    before = [len(e.requests) for e in cluster.prefill]
    started = time.perf_counter()
    second = asyncio.create_task(send(http, cluster))
    await until(lambda: hedges(cluster, "over_budget") == 1)  # its hedge is due: the one slot is taken
    held = max(range(3), key=lambda i: len(cluster.prefill[i].requests) - before[i])  # the second's own P
    for index, engine in enumerate(cluster.prefill):
        if index != held:
            engine.resume_answering()
    assert (await asyncio.wait_for(first, 2))[0] == 200
    assert (await asyncio.wait_for(second, 2))[0] == 200
    assert time.perf_counter() - started < 1.0  # hedged once the slot freed, not after its 1.5 s timeout
    assert outcome(cluster, held, "hedged") == 1
    assert outcome(cluster, held, "timeout") == 0
    assert hedges(cluster, "over_budget") == 1
    cluster.prefill[held].resume_answering()


async def test_budget_zero_turns_hedging_off(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(prefill_hedge_budget=0, prefill_hedge_floor=0.01, prefill_timeout=0.3,
                                    prefill_policy="round_robin", eject_after=0)
    status, hung = await only_the_first_p_hangs(http, cluster)
    assert status == 200  # after the hung attempt's own 0.3 s timeout
    assert outcome(cluster, hung, "timeout") == 1
    assert sum(hedges(cluster, result) for result in ("won", "lost", "failed", "over_budget", "no_upstream")) == 0
    cluster.prefill[hung].resume_answering()
