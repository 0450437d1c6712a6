"""Side routes: /health, /v1/models, /metrics."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory, closed_port_url


async def test_health_ok_lists_routable_counts(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.get(cluster.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "prefill": {"routable": 2, "total": 2},
                                     "decode": {"routable": 1, "total": 1}}


async def test_health_503_names_every_missing_role(cluster_factory: ClusterFactory,
                                                   http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(healthy_panic_threshold=0)  # in panic, ejected members would be routable
    for upstream in cluster.upstreams():
        upstream.state = State.EJECTED
    async with http.get(cluster.url + "/health") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "unavailable"
    assert body["reason"] == "no routable prefill upstream; no routable decode upstream"


async def test_models_are_relayed_from_a_decode_server(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.get(cluster.url + "/v1/models", headers={"X-Request-Id": "m1"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "m1"
        body = await resp.json()
    assert body["data"][0]["id"] == "mock"
    assert not any(e.requests for e in cluster.prefill)


async def test_models_with_the_decode_server_down_gives_502(cluster_factory: ClusterFactory,
                                                            http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=0, extra_decode=(closed_port_url(),))
    async with http.get(cluster.url + "/v1/models") as resp:
        assert resp.status == 502
        assert "cannot connect to decode upstream" in (await resp.json())["error"]["message"]


async def test_metrics_parse_and_count_requests(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.post(cluster.url + "/v1/completions",
                         json={"model": "mock", "prompt": "hi", "max_tokens": 2, "stream": True}) as resp:
        await resp.read()
    await cluster.assert_no_leaks()
    async with http.get(cluster.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("pdproxy_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert samples[("pdproxy_time_to_first_token_seconds_count", ())] == 1
    assert samples[("pdproxy_handoff_gap_seconds_count", ())] == 1
    assert samples[("pdproxy_upstream_in_flight", (("role", "decode"), ("upstream", cluster.decode_urls[0])))] == 0
    assert samples[("pdproxy_upstreams", (("role", "prefill"), ("state", "unknown")))] == 2
    assert ("process_resident_memory_bytes", ()) in samples
