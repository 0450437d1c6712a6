"""Fault injection with real mock engines on loopback: the proxy keeps serving and says what it does.

Every scenario counts requests sent and failed; the cluster fixture checks after each test that
every in-flight count is back to zero.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from pdproxy.mock import MockConfig
from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory, sse_events

STREAM = {"model": "mock", "prompt": "hello there", "max_tokens": 8, "stream": True}
FAST_HEALTH = {"health_interval": 0.05, "health_timeout": 0.5, "health_rise": 2, "health_fall": 2}


async def send(http: aiohttp.ClientSession, cluster: Cluster, body: dict[str, Any] = STREAM) -> str:
    """One request; 'ok' for a complete answer, else what went wrong."""
    try:
        async with http.post(cluster.url + "/v1/completions", json=body) as resp:
            payload = await resp.read()
    except aiohttp.ClientError as exc:
        return type(exc).__name__
    if resp.status != 200:
        return f"status {resp.status}"
    if body.get("stream") and not payload.endswith(b"data: [DONE]\n\n"):
        return "broken stream"
    return "ok"


async def load(http: aiohttp.ClientSession, cluster: Cluster, requests: int, concurrency: int,
               body: dict[str, Any] = STREAM, midway: Callable[[], Awaitable[None]] | None = None) -> Counter[str]:
    """Send `requests` requests, `concurrency` at a time; run `midway` once half have been sent."""
    results: Counter[str] = Counter()
    queue = list(range(requests))
    halfway = asyncio.Event()

    async def worker() -> None:
        while queue:
            index = queue.pop()
            if index == requests // 2:
                halfway.set()
            results[await send(http, cluster, body)] += 1

    async def trigger() -> None:
        if midway is not None:
            await halfway.wait()
            await midway()

    await asyncio.gather(trigger(), *(worker() for _ in range(concurrency)))
    return results


async def test_prefill_server_killed_under_load_no_client_error(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(prefill_config=MockConfig(role="prefill", ttft_ms=20), **FAST_HEALTH)
    victim = cluster.prefill[0]
    results = await load(http, cluster, 120, 8, midway=lambda: cluster.kill(victim))
    assert results == Counter({"ok": 120}), results
    await cluster.wait_state(cluster.prefill_urls[0], State.UNHEALTHY, State.EJECTED)
    assert cluster.prefill[1].stats.prefills >= 60


async def test_prefill_answering_500s_is_ejected_then_returns(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(prefill_policy="round_robin", eject_after=3, eject_base_time=0.3,
                                    **FAST_HEALTH)
    flaky, url = cluster.prefill[0], cluster.prefill_urls[0]
    flaky.fail_next(500, times=3)
    results = await load(http, cluster, 12, 1)
    assert results == Counter({"ok": 12}), results  # each 500 was failed over
    assert cluster.metric("pdproxy_upstream_ejections_total", role="prefill", upstream=url) == 1
    assert "answered 500" in (cluster.upstream(url).last_error or "")
    await cluster.wait_state(url, State.HEALTHY)  # after 0.3 s, on its next good probe
    served_before = len(flaky.requests)
    assert await load(http, cluster, 4, 1) == Counter({"ok": 4})
    assert len(flaky.requests) - served_before == 2  # round robin includes it again


async def test_hanging_prefill_times_out_and_fails_over(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(prefill_policy="round_robin", prefill_timeout=0.2)
    cluster.prefill[0].hang_next(times=2)
    assert await load(http, cluster, 4, 2) == Counter({"ok": 4})
    assert cluster.metric("pdproxy_timeouts_total", stage="prefill") == 0  # failed over, never reached a client
    assert cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=cluster.prefill_urls[0],
                          outcome="timeout") == 2


async def test_prefill_deadline_bounds_all_attempts(cluster_factory: ClusterFactory,
                                                    http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=3, prefill_timeout=0.2, prefill_deadline=0.3, eject_after=0)
    for engine in cluster.prefill:
        engine.hang_next()
    async with http.post(cluster.url + "/v1/completions", json=STREAM) as resp:
        assert resp.status == 504
        assert "timed out (prefill after" in (await resp.json())["error"]["message"]
    # 3 servers and 2 retries, but the 0.3 s deadline leaves no time for a third 0.2 s attempt.
    assert 1 <= sum(len(e.requests) for e in cluster.prefill) <= 2


async def test_decode_failing_before_first_byte_reruns_the_whole_flow(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin")
    cluster.decode[0].fail_next(500)
    assert await load(http, cluster, 1, 1) == Counter({"ok": 1})
    prefills = [r for e in cluster.prefill for r in e.requests]
    assert len(prefills) == 2  # a fresh prefill: the first handle's blocks may be gone
    assert cluster.decode[1].stats.decodes_with_valid_handle == 1
    assert cluster.metric("pdproxy_flow_retries_total") == 1


async def test_decode_first_byte_timeout_is_not_rerun(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    """D accepted the stream and sent nothing in time: 504, and no second flow (D may still be working)."""
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin", decode_first_byte_timeout=0.2)
    cluster.decode[0].hang_next()
    async with http.post(cluster.url + "/v1/completions", json=STREAM) as resp:
        assert resp.status == 504
        assert "sent no first byte within 0.2s" in (await resp.json())["error"]["message"]
    assert [len(e.requests) for e in cluster.decode] == [1, 0]
    assert sum(len(e.requests) for e in cluster.prefill) == 1
    assert cluster.metric("pdproxy_flow_retries_total") == 0
    assert cluster.metric("pdproxy_timeouts_total", stage="decode_first_byte") == 1


async def test_non_streamed_decode_has_its_own_response_timeout_and_is_not_rerun(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    """A whole non-streamed answer is bounded by decode_response_timeout (not the first-byte one), and a
    generation that outlasts it is not generated again on another D."""
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin", decode_first_byte_timeout=0.05,
                                    decode_response_timeout=0.3,
                                    decode_config=MockConfig(role="decode", ttft_ms=100))
    body = {**STREAM, "stream": False}
    assert await load(http, cluster, 1, 1, body) == Counter({"ok": 1})  # 100 ms > the first-byte timeout: fine
    cluster.decode[1].hang_next()
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        assert resp.status == 504
        assert "timed out (decode response after 0.3s)" in (await resp.json())["error"]["message"]
    assert [len(e.requests) for e in cluster.decode] == [1, 1]  # the hung one was not followed by a rerun
    assert cluster.metric("pdproxy_flow_retries_total") == 0
    assert cluster.metric("pdproxy_timeouts_total", stage="decode_response") == 1
    decode_url = cluster.decode_urls[1]
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=decode_url,
                          outcome="timeout") == 1


async def test_decode_rerun_only_on_connect_errors_5xx_and_kv_load_errors(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    """Before the first byte: a 5xx and a KV-load error event rerun the flow (on the same D when it is the only
    one: a fresh prefill is what fixes a lost KV)."""
    cluster = await cluster_factory(n_decode=1, eject_after=0)
    cluster.decode[0].fail_next(503)
    assert await load(http, cluster, 1, 1) == Counter({"ok": 1})
    cluster.decode[0].lose_kv_next()
    assert await load(http, cluster, 1, 1) == Counter({"ok": 1})
    assert cluster.metric("pdproxy_flow_retries_total") == 2
    assert sum(len(e.requests) for e in cluster.prefill) == 4  # each rerun had its own prefill


async def test_decode_dying_mid_stream_is_never_retried(cluster_factory: ClusterFactory,
                                                        http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2)
    for engine in cluster.decode:
        engine.die_after(2)
    async with http.post(cluster.url + "/v1/completions", json=STREAM) as resp:
        events = sse_events(await resp.read())
    assert "decode stream broke" in orjson.loads(events[-1])["error"]["message"]
    assert sum(len(e.requests) for e in cluster.decode) == 1  # no duplicated text from a second decode
    assert cluster.metric("pdproxy_flow_retries_total") == 0


async def test_decode_total_timeout_caps_a_stream(cluster_factory: ClusterFactory,
                                                  http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=50), decode_timeout=0.3)
    async with http.post(cluster.url + "/v1/completions", json=STREAM | {"max_tokens": 100}) as resp:
        events = sse_events(await resp.read())
    assert orjson.loads(events[-1])["error"]["message"] == "decode stream broke: decode total timeout (0.3s)"
    assert 2 <= len(events) < 100
    assert cluster.metric("pdproxy_timeouts_total", stage="decode_total") == 1
    await cluster.decode[0].wait_idle()  # D saw its connection close


async def test_all_prefill_down_fails_fast_then_recovers_without_restart(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(healthy_panic_threshold=0, **FAST_HEALTH)  # in panic, the dead ones are tried
    for engine in list(cluster.prefill):
        await cluster.kill(engine)
    for url in cluster.prefill_urls:
        await cluster.wait_state(url, State.UNHEALTHY)
    results = await load(http, cluster, 20, 4)
    assert results == Counter({"status 503": 20})
    assert not cluster.decode[0].requests
    for engine in list(cluster.prefill):
        await cluster.revive(engine)
    for url in cluster.prefill_urls:
        await cluster.wait_state(url, State.HEALTHY)
    assert await load(http, cluster, 20, 4) == Counter({"ok": 20})


async def test_health_flapping_follows_rise_and_fall(cluster_factory: ClusterFactory,
                                                     http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(**FAST_HEALTH)
    engine, url = cluster.prefill[0], cluster.prefill_urls[0]
    await cluster.wait_state(url, State.HEALTHY)
    for _ in range(3):
        engine.healthy = False
        await cluster.wait_state(url, State.UNHEALTHY)
        probes = engine.health_probes
        results = await load(http, cluster, 6, 2)  # all served by the other prefill server
        assert results == Counter({"ok": 6})
        assert engine.stats.prefills == 0
        engine.healthy = True
        await cluster.wait_state(url, State.HEALTHY)
        assert engine.health_probes - probes >= 2  # rise = 2 good probes
    async with http.get(cluster.url + "/health?verbose=1") as resp:
        upstreams = (await resp.json())["upstreams"]
    assert {u["url"]: u["state"] for u in upstreams}[url] == "healthy"


async def test_new_upstream_that_is_down_gets_no_traffic(cluster_factory: ClusterFactory,
                                                         http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(**FAST_HEALTH)
    engine, url = cluster.prefill[0], cluster.prefill_urls[0]
    engine.healthy = False
    await cluster.wait_state(url, State.UNHEALTHY)  # one failed probe is enough for an unknown server
    assert "answered 503" in (cluster.upstream(url).last_error or "")


async def test_per_upstream_cap_is_skipped_by_the_policy(cluster_factory: ClusterFactory,
                                                         http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(prefill_policy="prefix_hash", prefill_max_in_flight=1)
    for engine in cluster.prefill:
        engine.hang_next()
    tasks = [asyncio.create_task(send(http, cluster)) for _ in range(2)]  # same prompt: same home server
    for engine in cluster.prefill:
        await engine.wait_for_requests(1)  # the second went to the other server: the home one is full
    assert [u.in_flight for u in cluster.flow.prefill_pool.members] == [1, 1]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_full_proxy_queues_then_serves_in_order(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(max_concurrency=1, queue_size=10, queue_timeout=5,
                                    decode_config=MockConfig(role="decode", itl_ms=5))
    results = await asyncio.gather(*(send(http, cluster) for _ in range(6)))
    assert results == ["ok"] * 6
    assert cluster.metric("pdproxy_queue_rejections_total", reason="full") == 0


async def test_queue_full_and_queue_timeout_get_503_with_retry_after(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(max_concurrency=1, queue_size=1, queue_timeout=0.3)
    for engine in cluster.prefill:
        engine.hang_next()
    holder = asyncio.create_task(send(http, cluster))
    await cluster.wait_any_prefill()
    waiter = asyncio.create_task(http.post(cluster.url + "/v1/completions", json=STREAM))
    await _until(lambda: cluster.flow.admission.waiting == 1)
    async with http.post(cluster.url + "/v1/completions", json=STREAM) as resp:  # the queue is full
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert "queue is full" in (await resp.json())["error"]["message"]
    async with await waiter as resp:  # waited 0.3 s for the held slot
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert "no slot within 0.3s" in (await resp.json())["error"]["message"]
    assert cluster.metric("pdproxy_queue_rejections_total", reason="full") == 1
    assert cluster.metric("pdproxy_queue_rejections_total", reason="timeout") == 1
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)


async def test_queue_honours_client_disconnects(cluster_factory: ClusterFactory,
                                                http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(decode_max_in_flight=1, queue_timeout=5)
    cluster.prefill[0].hang_next()
    cluster.prefill[1].hang_next()
    holder = asyncio.create_task(send(http, cluster))
    await cluster.wait_any_prefill()
    waiters = [asyncio.create_task(send(http, cluster)) for _ in range(3)]
    await _until(lambda: cluster.flow.admission.waiting == 3)
    for task in waiters:
        task.cancel()  # the clients give up while queued
    await asyncio.gather(*waiters, return_exceptions=True)
    await _until(lambda: cluster.flow.admission.waiting == 0)
    assert cluster.metric("pdproxy_client_disconnects_total", stage="queue") == 3
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)


async def test_drain_refuses_new_requests_and_finishes_open_streams(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    from pdproxy.app import drain

    cluster = await cluster_factory()
    cluster.decode[0].hold()  # the streams stay open until the checks below are done
    open_streams = [asyncio.create_task(send(http, cluster, STREAM | {"max_tokens": 20})) for _ in range(4)]
    await cluster.decode[0].wait_until(lambda stats: stats.in_flight == 4)
    drained = asyncio.create_task(drain(cluster.flow, timeout=10))
    await _until(lambda: cluster.flow.draining)
    async with http.get(cluster.url + "/health") as resp:
        assert resp.status == 503
        assert "draining" in (await resp.json())["reason"]
    assert await send(http, cluster) == "status 503"
    assert not drained.done()
    cluster.decode[0].release()
    await drained
    assert await asyncio.gather(*open_streams) == ["ok"] * 4


async def _until(check: Callable[[], bool], timeout: float = 5) -> None:
    """Yield to the loop until `check()` holds, within `timeout`. Only for proxy state that has no
    event (the queue length): the proxy adds no test-only signalling to its request path."""

    async def poll() -> None:
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)
