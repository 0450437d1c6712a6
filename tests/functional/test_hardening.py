"""Probe findings fixed on the request path, through the real proxy: deep nesting (F4), forged request ids
(F17), loops through an upstream that points back at the proxy (F9)."""

from __future__ import annotations

import aiohttp

from tests.conftest import Cluster, ClusterFactory

COMPLETION = {"model": "mock", "prompt": "hello", "max_tokens": 2}


async def test_deep_nesting_is_a_400_not_a_500(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    body = b'{"model":"mock","prompt":"x","x":' + b"[" * 300 + b"]" * 300 + b"}"
    async with http.post(cluster.url + "/v1/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert "nests deeper than" in (await resp.json())["error"]["message"]
    assert not any(engine.requests for engine in cluster.prefill)


async def test_a_forged_request_id_is_replaced(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    forged = "x 10.9.9.9 /v1/completions 200 P=http://fake:1"
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers={"X-Request-Id": forged}) as resp:
        assert resp.status == 200
        given = resp.headers["X-Request-Id"]
    assert given != forged and " " not in given
    sent = [r.header("X-Request-Id") for engine in (*cluster.prefill, *cluster.decode) for r in engine.requests]
    assert sent == [given, given]  # the same fresh id to P and D
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION,
                         headers={"X-Request-Id": "ok-id_1.2:3"}) as resp:
        assert resp.headers["X-Request-Id"] == "ok-id_1.2:3"


async def test_a_proxy_that_is_its_own_upstream_fails_fast_with_508(cluster_factory: ClusterFactory,
                                                                    http: aiohttp.ClientSession) -> None:
    """The first hop adds its Via pseudonym; the request that comes back through the 'upstream' carries it."""
    cluster = await cluster_factory(health_interval=0)
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION) as resp:
        assert resp.status == 200
    via = next(e for e in cluster.prefill if e.requests).requests[-1].header("Via")
    assert via is not None and "pdproxy-" in via
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers={"Via": via}) as resp:
        assert resp.status == 508
        assert (await resp.json())["error"]["type"] == "loop_detected"
    assert sum(len(e.requests) for e in cluster.prefill) == 1  # the looped request reached no engine
