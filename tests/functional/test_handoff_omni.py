"""`--kv-adapter omni` through the proxy, against mock engines speaking omni's LLMDataDist protocol.

omni is a sequential handoff, so today's request path runs it; these tests are black-box (HTTP in,
engine-side records out) and hold for the orchestrator that replaces it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from pdproxy.mock import MockConfig
from tests.conftest import Cluster, ClusterFactory, sse_events

P_CONFIG = MockConfig(role="prefill", protocol="omni")
D_CONFIG = MockConfig(role="decode", protocol="omni")
FORGED = {"kv_transfer_params": {"remote_block_ids": [1], "remote_cluster_id": "x", "remote_host_ip": "tcp://evil:1"},
          "bootstrap_host": "evil", "bootstrap_room": 5}


async def omni(cluster_factory: ClusterFactory, **kw: Any) -> Cluster:
    kw.setdefault("prefill_config", P_CONFIG)
    kw.setdefault("decode_config", D_CONFIG)
    return await cluster_factory(kv_adapter="omni", **kw)


def bodies(cluster: Cluster) -> tuple[dict[str, Any], dict[str, Any]]:
    [prefill] = [r.body for e in cluster.prefill for r in e.requests]
    [decode] = [r.body for r in cluster.decode[0].requests]
    return prefill, decode


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_each_leg_gets_exactly_its_fields(cluster_factory: ClusterFactory, http: aiohttp.ClientSession,
                                                endpoint: str, stream: bool) -> None:
    cluster = await omni(cluster_factory)
    body: dict[str, Any] = {"model": "mock", "max_tokens": 5, "stream": stream, "temperature": 0.1, **FORGED}
    body |= {"prompt": "a b c"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with http.post(cluster.url + endpoint, json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    prefill, decode = bodies(cluster)
    clean = {k: v for k, v in body.items() if k not in FORGED}
    assert prefill == {**{k: v for k, v in clean.items() if k != "stream_options"},
                       "max_tokens": 1, "stream": False}  # no kv_transfer_params at all
    handle = decode.pop("kv_transfer_params")
    assert decode == clean
    assert handle["remote_cluster_id"] == next(e for e in cluster.prefill if e.requests).config.engine_id
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1
    if stream:
        events = sse_events(raw)
        assert events[-1] == b"[DONE]" and orjson.loads(events[-2])["usage"]["completion_tokens"] == 5
    else:
        assert orjson.loads(raw)["usage"]["completion_tokens"] == 5


async def test_prefill_stopped_before_the_cap_means_d_recomputes(cluster_factory: ClusterFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    cluster = await omni(cluster_factory, n_prefill=1, prefill_config=MockConfig(role="prefill", protocol="omni",
                                                                                 eos_after=1))
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "x", **FORGED}) as resp:
        assert resp.status == 200
    _, decode = bodies(cluster)
    assert "kv_transfer_params" not in decode and "bootstrap_host" not in decode
    assert cluster.decode[0].stats.decodes_without_handle == 1
    assert cluster.metric("pdproxy_kv_handoff_missing_total") == 1


async def test_p_failing_before_answering_fails_over(cluster_factory: ClusterFactory,
                                                     http: aiohttp.ClientSession) -> None:
    cluster = await omni(cluster_factory, prefill_policy="round_robin")
    cluster.prefill[0].drop_next()
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "x"}) as resp:
        assert resp.status == 200
    assert [len(e.requests) for e in cluster.prefill] == [1, 1]
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


async def test_d_killed_gives_a_clean_502(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await omni(cluster_factory, n_prefill=1)
    await cluster.kill(cluster.decode[0])
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "x"}) as resp:
        assert resp.status == 502
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


async def test_client_gone_during_prefill_cancels_it_and_never_calls_d(cluster_factory: ClusterFactory) -> None:
    cluster = await omni(cluster_factory, n_prefill=1)
    cluster.prefill[0].hang_next()
    session = aiohttp.ClientSession()
    body = {"model": "mock", "prompt": "x"}
    request = asyncio.ensure_future(session.post(cluster.url + "/v1/completions", json=body))
    await cluster.prefill[0].wait_for_requests(1)
    request.cancel()
    await session.close()
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    assert not cluster.decode[0].requests
    assert cluster.metric("pdproxy_client_disconnects_total", stage="prefill") == 1
    await cluster.assert_no_leaks()


async def test_client_gone_mid_decode_aborts_d_and_leaks_nothing(cluster_factory: ClusterFactory) -> None:
    cluster = await omni(cluster_factory, n_prefill=1)
    decode = cluster.decode[0]
    decode.stall_after(1)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + "/v1/completions",
                                  json={"model": "mock", "prompt": "x", "max_tokens": 50, "stream": True})
        assert resp.status == 200
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
    await decode.wait_until(lambda s: s.aborted == 1)
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    assert cluster.metric("pdproxy_client_disconnects_total", stage="decode") == 1
    await cluster.assert_no_leaks()


async def test_p_killed_before_answering_fails_over(cluster_factory: ClusterFactory,
                                                    http: aiohttp.ClientSession) -> None:
    cluster = await omni(cluster_factory, prefill_policy="round_robin")
    first, second = cluster.prefill
    first.hang_next()
    reply = asyncio.ensure_future(http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "x"}))
    await first.wait_for_requests(1)
    await cluster.kill(first)
    async with await asyncio.wait_for(reply, 3) as resp:
        assert resp.status == 200
    assert len(second.requests) == 1 and cluster.decode[0].stats.decodes_with_valid_handle == 1
    failed = sum(cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=cluster.prefill_urls[0],
                                outcome=o) for o in ("connect_error", "bad_response", "timeout", "bad_status"))
    assert failed == 1


async def test_p_killed_after_answering_leaves_the_stream_alone(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    cluster = await omni(cluster_factory, n_prefill=1)
    decode = cluster.decode[0]
    decode.hold()  # D streams its first token, then waits: P has answered by then
    async with http.post(cluster.url + "/v1/completions",
                         json={"model": "mock", "prompt": "x", "max_tokens": 4, "stream": True}) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        await cluster.kill(cluster.prefill[0])
        decode.release()
        raw = first + await resp.read()
    assert sse_events(raw)[-1] == b"[DONE]" and b"error" not in raw
