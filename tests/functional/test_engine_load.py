"""Engine load read from the mock engine's /metrics: the gauges, expiry of stale readings, and the
policies counting requests that other replicas sent."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from pdproxy.mock import MockConfig, start_mock
from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.request import ProxyRequest
from pdproxy.routing.engine_load import EngineLoads, EngineReading, parse_engine_metrics
from pdproxy.upstreams import Role, Upstream

OPTIONS = PolicyOptions(prefix_chars=256, vnodes=40, load_factor=0.25, block_chars=64, index_max_blocks=1000,
                        cache_weight=2.0, cache_load="tokens", chars_per_token=4.0)


async def test_the_mock_reports_running_and_waiting_requests() -> None:
    engine, runner, url = await start_mock(MockConfig(role="prefill", ttft_ms=400, prefill_ms_per_token=2.0))
    loads = EngineLoads(0.05)
    upstream = Upstream(Role.PREFILL, url)
    try:
        async with aiohttp.ClientSession() as http:
            async def one(i: int) -> None:
                async with http.post(url + "/v1/completions",
                                     json={"model": "mock", "prompt": f"p{i} " * 100, "max_tokens": 1}) as resp:
                    assert resp.status == 200

            requests = [asyncio.ensure_future(one(i)) for i in range(3)]  # 200 ms of compute each, one at a time
            await engine.wait_until(lambda s: s.in_flight == 3)
            await loads.poll_once(http, [upstream])
            reading = loads.reading(upstream)
            assert reading is not None and reading.running + reading.waiting == 3 and reading.waiting == 2
            assert reading.kv_usage is not None and 0 < reading.kv_usage < 1
            await asyncio.gather(*requests)
            await loads.poll_once(http, [upstream])
            assert loads.requests(upstream) == 0
    finally:
        await runner.cleanup()


async def test_a_reading_expires_and_an_engine_that_stops_answering_is_forgotten() -> None:
    now = [10.0]
    loads = EngineLoads(1.0, clock=lambda: now[0], timeout=0.5)
    _, runner, url = await start_mock(MockConfig(role="prefill"))
    upstream = Upstream(Role.PREFILL, url)
    async with aiohttp.ClientSession() as http:
        await loads.poll_once(http, [upstream])
        assert loads.reading(upstream) is not None
        await runner.cleanup()  # gone: the poll fails, the old reading stays until it expires
        await loads.poll_once(http, [upstream])
        assert loads.reading(upstream) is not None
        now[0] += 3.01  # older than 3 intervals
        assert loads.reading(upstream) is None and loads.requests(upstream) == 0


@pytest.mark.parametrize("policy", ["least_tokens", "cache_aware"])
def test_a_busy_engine_loses_although_this_proxy_sent_it_nothing(policy: str) -> None:
    loads = EngineLoads(1.0, clock=lambda: 5.0)
    busy, idle = Upstream(Role.PREFILL, "http://10.0.0.1:1"), Upstream(Role.PREFILL, "http://10.0.0.2:1")
    balancer = make_balancer(policy, OPTIONS, rng=random.Random(1))
    request = ProxyRequest("/v1/completions", {"prompt": "hello world " * 30}, False, "r", {})
    balancer.use_engine_load(loads)  # type: ignore[attr-defined]
    loads.record(busy.url, EngineReading(running=1, waiting=4, kv_usage=0.5, at=5.0))
    loads.record(idle.url, EngineReading(running=0, waiting=0, kv_usage=0.1, at=5.0))
    assert all(balancer.choose([busy, idle], request) is idle for _ in range(5))
    loads.record(busy.url, EngineReading(running=0, waiting=0, kv_usage=0.5, at=5.0))
    loads.record(idle.url, EngineReading(running=3, waiting=0, kv_usage=0.1, at=5.0))
    other = ProxyRequest("/v1/completions", {"prompt": "another prompt " * 30}, False, "s", {})  # cached nowhere
    assert balancer.choose([busy, idle], other) is busy


def test_metrics_without_the_gauges_give_no_reading() -> None:
    assert parse_engine_metrics("# TYPE up gauge\nup 1\n", 1.0) is None
    text = 'vllm:num_requests_running{engine="0"} 2\nvllm:num_requests_running{engine="1"} 1\n' \
           'vllm:gpu_cache_usage_perc{engine="0"} 0.25\n'
    reading = parse_engine_metrics(text, 1.0)
    assert reading == EngineReading(running=3, waiting=0, kv_usage=0.25, at=1.0)
