"""A client that goes away cancels the upstream work at once, and every lease comes back."""

from __future__ import annotations

import asyncio

import aiohttp

from pdproxy.mock import MockConfig
from tests.conftest import Cluster, ClusterFactory


async def test_disconnect_during_prefill_cancels_the_prefill(cluster: Cluster) -> None:
    for engine in cluster.prefill:
        engine.hang_next()
    session = aiohttp.ClientSession()
    request = asyncio.ensure_future(
        session.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 4})
    )
    await cluster.wait_any_prefill()
    assert cluster.flow.in_flight == 1
    request.cancel()
    await session.close()  # the client is gone
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    for engine in cluster.prefill:  # P saw its connection close: its handler was cancelled
        await engine.wait_idle()
    assert all(u.in_flight == 0 for u in cluster.upstreams())
    assert not cluster.decode[0].requests  # no decode after the client left during prefill
    assert cluster.metric("pdproxy_client_disconnects_total", stage="prefill") == 1
    assert cluster.metric("pdproxy_requests_total", endpoint="/v1/completions", status="499") == 1


async def test_disconnect_mid_stream_closes_the_decode_connection(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=20))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + "/v1/completions",
                                  json={"model": "mock", "prompt": "hi", "max_tokens": 500, "stream": True})
        assert resp.status == 200
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        resp.close()  # drop the connection mid-stream
    decode = cluster.decode[0]
    await decode.wait_until(lambda stats: stats.aborted == 1)  # D noticed, as vLLM would abort
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    assert decode.stats.completed == 0
    assert all(u.in_flight == 0 for u in cluster.upstreams())
    assert cluster.metric("pdproxy_client_disconnects_total", stage="decode") == 1
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=cluster.decode_urls[0],
                          outcome="cancelled") == 1


async def test_many_disconnects_leak_nothing(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=5))
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            resp = await session.post(cluster.url + "/v1/chat/completions",
                                      json={"model": "mock", "messages": [{"role": "user", "content": str(i)}],
                                            "max_tokens": 200, "stream": True})
            for _ in range(i % 4):
                await resp.content.readany()
            resp.close()

        await asyncio.gather(*(one(i) for i in range(40)))
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    await cluster.decode[0].wait_idle()
    assert all(u.in_flight == 0 for u in cluster.upstreams())
