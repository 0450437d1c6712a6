"""Concurrent handoffs through the real proxy: `--kv-adapter sglang | mooncake | nixl-push` against mock
engines that speak each protocol (P and D called at once; D waits for the KV only P makes).

Every test is black-box: HTTP in, what each engine received and counted out, plus the proxy's own
accounting (leases, in-flight, outcomes per upstream).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from pdproxy.app import build_app, start_server
from pdproxy.handoff.discovery import PENDING
from pdproxy.handoff.sglang import SglangHandoff
from pdproxy.handoff.vllm_nixl import PREFILL_REQUEST
from pdproxy.mock import MockConfig, MockEngine, start_mock
from pdproxy.settings import Settings
from pdproxy.tracing import NO_TRACING, Tracing
from tests.conftest import Cluster, check_and_stop, closed_port_url, sse_events

ADAPTERS = ("sglang", "mooncake", "nixl-push")
FORGED = {"kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "evil"},
          "bootstrap_host": "evil", "bootstrap_port": 1, "bootstrap_room": 5}
FAILURES = ("timeout", "connect_error", "bad_status", "bad_response", "broken")
Factory = Callable[..., Awaitable[Cluster]]


def handoff_meta(adapter: str, engine: MockEngine, url: str) -> dict[str, Any]:
    """What an operator gives in --handoff-meta for a mock P (Mooncake's and NIXL push's ports are not on
    P's HTTP API; SGLang's is discovered from /get_server_info)."""
    if adapter == "mooncake":
        return {url: {"bootstrap_port": engine.bootstrap_port}}
    if adapter == "nixl-push":
        return {url: {"engine_id": engine.config.engine_id, "side_channel_port": engine.bootstrap_port}}
    return {}


@pytest.fixture
async def pd() -> AsyncIterator[Factory]:
    """Build a proxy with `kv_adapter` over fresh mock engines of that protocol; after the test, check
    that every request finished and every lease came back, then stop everything."""
    clusters: list[Cluster] = []

    async def make(adapter: str, n_prefill: int = 2, n_decode: int = 1, *, prefill: dict[str, Any] | None = None,
                   decode: dict[str, Any] | None = None, wait_routable: bool = True,
                   meta: Callable[[str], dict[str, Any]] | None = None, tracing: Tracing = NO_TRACING,
                   **settings: Any) -> Cluster:
        runners: dict[int, web.AppRunner] = {}
        engines: dict[str, list[MockEngine]] = {"prefill": [], "decode": []}
        urls: dict[str, list[str]] = {"prefill": [], "decode": []}
        given: dict[str, Any] = {}
        for role, count, extra in (("prefill", n_prefill, prefill), ("decode", n_decode, decode)):
            for i in range(count):
                config = MockConfig(role=role, protocol=adapter, engine_id=f"{role}-{i}",
                                    **{"kv_timeout_ms": 1500, **(extra or {})})
                engine, runner, url = await start_mock(config)
                runners[id(engine)] = runner
                engines[role].append(engine)
                urls[role].append(url)
                if role == "prefill":
                    given |= handoff_meta(adapter, engine, url) if meta is None else meta(url)
        settings.setdefault("access_log", False)
        settings.setdefault("health_interval", 0)
        app = build_app(Settings(prefill_servers=",".join(urls["prefill"]), decode_servers=",".join(urls["decode"]),
                                 kv_adapter=adapter, handoff_meta=given, **settings), rng=random.Random(0),
                        tracing=tracing)
        runner, url = await start_server(app, "127.0.0.1", 0)
        cluster = Cluster(engines["prefill"], engines["decode"], url, app, urls["prefill"], urls["decode"],
                          [runner], runners)
        clusters.append(cluster)
        if wait_routable:
            await cluster.wait_for(lambda: all(u.routable for u in cluster.flow.prefill_pool.members), 3)
        return cluster

    yield make
    await check_and_stop(clusters)


def request_body(endpoint: str, stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mock", "max_tokens": 5, "stream": stream, "temperature": 0.1, **extra}
    if endpoint == "/v1/completions":
        return {**body, "prompt": "tell me about rooms"}
    return {**body, "messages": [{"role": "user", "content": "tell me about rooms"}]}


def one_token(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's prefill body of the client's: one token, not streamed."""
    prefill = {k: v for k, v in body.items() if k != "stream_options"}
    return {**prefill, "stream": False, "max_tokens": 1}


def requests_of(engines: list[MockEngine]) -> list[Any]:
    return [r for e in engines for r in e.requests]


def outcomes(cluster: Cluster, url: str, role: str) -> dict[str, float]:
    names = (*FAILURES, "ok", "cancelled", "kv_lost", "rejected")
    found = {n: cluster.metric("pdproxy_upstream_requests_total", role=role, upstream=url, outcome=n) for n in names}
    return {n: v for n, v in found.items() if v}


def failures(cluster: Cluster, url: str, role: str) -> float:
    return sum(v for n, v in outcomes(cluster, url, role).items() if n in FAILURES)


async def read_all(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.read()


# ---------------------------------------------------------------- what each leg receives


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_each_leg_gets_exactly_its_fields(pd: Factory, http: aiohttp.ClientSession, adapter: str,
                                                endpoint: str, stream: bool) -> None:
    cluster = await pd(adapter, n_prefill=1)
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    body = {**request_body(endpoint, stream, **extra), **FORGED}
    status, raw = await read_all(http, cluster.url + endpoint, body)
    assert status == 200, raw
    clean = {k: v for k, v in body.items() if k not in FORGED}
    p_engine, d_engine = cluster.prefill[0], cluster.decode[0]
    [p_req], [d_req] = p_engine.requests, d_engine.requests
    assert p_req.path == d_req.path == endpoint
    rid = p_req.header("X-Request-Id")
    assert rid and d_req.header("X-Request-Id") == rid
    if adapter == "sglang":
        room = p_req.body["bootstrap_room"]
        assert isinstance(room, int) and 0 <= room < 2**63
        expected = {**clean, "bootstrap_host": "127.0.0.1", "bootstrap_port": p_engine.bootstrap_port,
                    "bootstrap_room": room}
        assert p_req.body == expected and d_req.body == expected  # the same body to both, stream untouched
    elif adapter == "mooncake":
        transfer_id = p_req.body["kv_transfer_params"]["transfer_id"]
        assert transfer_id.startswith("xfer-")
        assert p_req.body == {**one_token(clean), "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "transfer_id": transfer_id}}
        assert p_req.header("X-data-parallel-rank") == "0"
        assert d_req.body == {**clean, "kv_transfer_params": {
            "do_remote_decode": False, "do_remote_prefill": True,
            "remote_bootstrap_addr": f"http://127.0.0.1:{p_engine.bootstrap_port}",
            "remote_engine_id": p_engine.engine_ids[0], "transfer_id": transfer_id}}
    else:
        transfer_id = p_req.body["kv_transfer_params"]["transfer_id"]
        assert p_req.body == {**one_token(clean), "kv_transfer_params": {**PREFILL_REQUEST, "transfer_id": transfer_id}}
        assert d_req.body == {**clean, "kv_transfer_params": {
            "do_remote_decode": False, "do_remote_prefill": True, "remote_engine_id": "prefill-0",
            "remote_host": "127.0.0.1", "remote_port": p_engine.bootstrap_port, "tp_size": 1, "pp_size": 1,
            "remote_request_id": rid, "transfer_id": transfer_id}}
    assert d_engine.stats.decodes_with_valid_handle == 1 and d_engine.stats.decodes_with_invalid_handle == 0
    if stream:
        events = sse_events(raw)
        assert events[-1] == b"[DONE]" and orjson.loads(events[-2])["usage"]["completion_tokens"] == 5
    else:
        assert orjson.loads(raw)["usage"]["completion_tokens"] == 5
    assert outcomes(cluster, cluster.prefill_urls[0], "prefill") == {"ok": 1}
    assert outcomes(cluster, cluster.decode_urls[0], "decode") == {"ok": 1}


async def test_sglang_batches_run_one_flow_and_one_room_per_prompt(pd: Factory, http: aiohttp.ClientSession) -> None:
    """A batch (or n > 1) fans out above the orchestrator (proxy/fanout.py): each flow carries one prompt, so
    the handoff's per-prompt arrays are never needed on the wire; every room is given back."""
    cluster = await pd("sglang", n_prefill=1)
    handoff = cluster.flow.handoff
    assert isinstance(handoff, SglangHandoff)
    for endpoint, body in (("/v1/completions", {"model": "mock", "prompt": ["a", "b"], "max_tokens": 2}),
                           ("/v1/chat/completions", {**request_body("/v1/chat/completions", False), "n": 2})):
        status, raw = await read_all(http, cluster.url + endpoint, body)
        assert status == 200, raw
        assert [c["index"] for c in orjson.loads(raw)["choices"]] == [0, 1]
    assert len(requests_of(cluster.prefill)) == 4 and len(cluster.decode[0].requests) == 4
    assert all(not isinstance(r.body.get("prompt"), list) for r in cluster.decode[0].requests)
    assert len(handoff.rooms) == 0


# ---------------------------------------------------------------- the sequential flow cannot run them


async def test_a_sequential_flow_deadlocks_against_sglang_and_the_concurrent_one_does_not(
    pd: Factory, http: aiohttp.ClientSession
) -> None:
    """The same proxy, once forced onto the sequential runner: P waits for a D that is never called."""
    cluster = await pd("sglang", n_prefill=1, prefill={"kv_timeout_ms": 300}, prefill_retries=0, flow_retries=0)
    flow = cluster.flow
    concurrent = flow._flow
    flow._flow = flow._run  # what a proxy that waits for P first does
    status, raw = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
    assert status == 502 and b"prefill upstream" in raw
    assert cluster.decode[0].requests == []  # D was never called: P gave up on its room
    flow._flow = concurrent
    status, _ = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
    assert status == 200
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


# ---------------------------------------------------------------- P fails


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_p_failing_before_answering_cancels_d_and_fails_over_with_a_new_plan(
    pd: Factory, http: aiohttp.ClientSession, adapter: str
) -> None:
    cluster = await pd(adapter, prefill_policy="round_robin", prefill={"ttft_ms": 50})
    p0, p1 = cluster.prefill
    d = cluster.decode[0]
    p0.fail_next(503)
    status, raw = await read_all(http, cluster.url + "/v1/chat/completions", request_body("/v1/chat/completions",
                                                                                         True))
    assert status == 200 and sse_events(raw)[-1] == b"[DONE]"
    assert (len(p0.requests), len(p1.requests)) == (1, 1)
    await d.wait_until(lambda s: s.aborted == 1, 2)  # the first D call was cut while it waited for KV
    first, second = (r.body for r in d.requests)
    if adapter == "sglang":
        assert first["bootstrap_room"] != second["bootstrap_room"]
        assert first["bootstrap_port"] == p0.bootstrap_port and second["bootstrap_port"] == p1.bootstrap_port
    else:
        assert first["kv_transfer_params"]["transfer_id"] != second["kv_transfer_params"]["transfer_id"]
    assert d.stats.decodes_with_valid_handle == 1
    assert outcomes(cluster, cluster.prefill_urls[0], "prefill") == {"bad_status": 1}
    assert outcomes(cluster, cluster.decode_urls[0], "decode") == {"cancelled": 1, "ok": 1}  # D is not blamed
    assert cluster.metric("pdproxy_prefill_retries_total") == 1


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_p_killed_before_answering_is_blamed_on_p_never_on_d(pd: Factory, http: aiohttp.ClientSession,
                                                                   adapter: str) -> None:
    cluster = await pd(adapter, prefill_policy="round_robin")
    p0, p1 = cluster.prefill
    d = cluster.decode[0]
    p0.hang_next()
    reply = asyncio.ensure_future(read_all(http, cluster.url + "/v1/completions",
                                           request_body("/v1/completions", False)))
    await p0.wait_for_requests(1)
    await d.wait_for_requests(1)
    await cluster.kill(p0)
    status, raw = await asyncio.wait_for(reply, 3)
    assert status == 200, raw
    assert len(p1.requests) == 1 and d.stats.decodes_with_valid_handle == 1
    assert failures(cluster, cluster.prefill_urls[0], "prefill") == 1
    assert failures(cluster, cluster.decode_urls[0], "decode") == 0
    assert cluster.upstream(cluster.decode_urls[0]).last_error is None


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_p_killed_after_answering_leaves_the_stream_alone(pd: Factory, http: aiohttp.ClientSession,
                                                                adapter: str) -> None:
    cluster = await pd(adapter, n_prefill=1)
    p, d = cluster.prefill[0], cluster.decode[0]
    d.hold()  # D streams its first token, then waits
    prefill = cluster.upstream(cluster.prefill_urls[0])
    async with http.post(cluster.url + "/v1/completions",
                         json=request_body("/v1/completions", True, max_tokens=4)) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        await cluster.wait_for(lambda: cluster.metric("pdproxy_upstream_requests_total", role="prefill",
                                                      upstream=prefill.url, outcome="ok") == 1)
        await cluster.kill(p)
        d.release()
        raw = first + await resp.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]" and b"error" not in raw
    assert outcomes(cluster, prefill.url, "prefill") == {"ok": 1}


# ---------------------------------------------------------------- D fails


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_d_killed_gives_a_clean_502_and_p_is_not_blamed(pd: Factory, http: aiohttp.ClientSession,
                                                              adapter: str) -> None:
    cluster = await pd(adapter, n_prefill=1, flow_retries=0)
    await cluster.kill(cluster.decode[0])
    status, raw = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", True))
    assert status == 502
    assert set(orjson.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert failures(cluster, cluster.decode_urls[0], "decode") == 1
    assert failures(cluster, cluster.prefill_urls[0], "prefill") == 0  # P was cancelled or had answered
    await cluster.prefill[0].wait_idle(2)  # P's leg ended (cancelled, or answered) with the request


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_d_failing_reruns_the_flow_on_another_d(pd: Factory, http: aiohttp.ClientSession,
                                                      adapter: str) -> None:
    cluster = await pd(adapter, n_prefill=1, n_decode=2, decode_policy="round_robin")
    d0, d1 = cluster.decode
    d0.fail_next(503)
    status, _ = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
    assert status == 200
    assert (len(d0.requests), len(d1.requests)) == (1, 1) and d1.stats.decodes_with_valid_handle == 1
    assert outcomes(cluster, cluster.decode_urls[0], "decode") == {"bad_status": 1}
    assert cluster.metric("pdproxy_flow_retries_total") == 1
    assert failures(cluster, cluster.prefill_urls[0], "prefill") == 0


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_d_dying_mid_stream_ends_it_with_an_error_event(pd: Factory, http: aiohttp.ClientSession,
                                                              adapter: str) -> None:
    cluster = await pd(adapter, n_prefill=1)
    cluster.decode[0].die_after(1)
    status, raw = await read_all(http, cluster.url + "/v1/completions",
                                 request_body("/v1/completions", True, max_tokens=8))
    assert status == 200
    last = orjson.loads(sse_events(raw)[-1])
    assert last["error"]["message"].startswith("decode stream broke")
    assert outcomes(cluster, cluster.decode_urls[0], "decode") == {"broken": 1}
    assert failures(cluster, cluster.prefill_urls[0], "prefill") == 0


# ---------------------------------------------------------------- the client goes away


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_client_gone_while_p_computes_cancels_both_legs(pd: Factory, adapter: str) -> None:
    cluster = await pd(adapter, n_prefill=1, prefill={"ttft_ms": 5000})
    p, d = cluster.prefill[0], cluster.decode[0]
    session = aiohttp.ClientSession()
    reply = asyncio.ensure_future(session.post(cluster.url + "/v1/completions",
                                               json=request_body("/v1/completions", True)))
    await p.wait_for_requests(1)
    await d.wait_for_requests(1)
    reply.cancel()
    await session.close()
    await p.wait_until(lambda s: s.aborted == 1, 2)
    await d.wait_until(lambda s: s.aborted == 1, 2)
    await cluster.assert_no_leaks()
    assert cluster.metric("pdproxy_client_disconnects_total", stage="prefill") == 1
    assert failures(cluster, cluster.prefill_urls[0], "prefill") == 0
    assert failures(cluster, cluster.decode_urls[0], "decode") == 0
    if adapter == "sglang":
        assert len(cluster.flow.handoff.rooms) == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_client_gone_mid_stream_cancels_d(pd: Factory, adapter: str) -> None:
    cluster = await pd(adapter, n_prefill=1)
    p, d = cluster.prefill[0], cluster.decode[0]
    d.stall_after(1)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + "/v1/completions",
                                  json=request_body("/v1/completions", True, max_tokens=50))
        assert resp.status == 200
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
    await d.wait_until(lambda s: s.aborted == 1, 2)
    await cluster.assert_no_leaks()
    assert p.stats.in_flight == 0 and d.stats.in_flight == 0
    assert cluster.metric("pdproxy_client_disconnects_total", stage="decode") == 1
    assert failures(cluster, cluster.decode_urls[0], "decode") == 0


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_requests_in_flight_together_never_share_a_room_or_transfer_id(
    pd: Factory, http: aiohttp.ClientSession, adapter: str
) -> None:
    cluster = await pd(adapter, n_prefill=2, prefill={"ttft_ms": 30})
    n = 8
    replies = await asyncio.wait_for(asyncio.gather(*(
        read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", i % 2 == 0))
        for i in range(n))), 5)
    assert [status for status, _ in replies] == [200] * n
    d_bodies = [r.body for r in cluster.decode[0].requests]
    if adapter == "sglang":
        keys = [b["bootstrap_room"] for b in d_bodies]
        assert sorted(keys) == sorted(r.body["bootstrap_room"] for r in requests_of(cluster.prefill))
        assert len(cluster.flow.handoff.rooms) == 0  # type: ignore[attr-defined]
    else:
        keys = [b["kv_transfer_params"]["transfer_id"] for b in d_bodies]
    assert len(set(keys)) == n
    assert cluster.decode[0].stats.decodes_with_valid_handle == n


# ---------------------------------------------------------------- metadata


async def test_a_p_whose_metadata_probe_fails_is_not_routable_and_says_why(pd: Factory,
                                                                           http: aiohttp.ClientSession) -> None:
    cluster = await pd("sglang", n_prefill=1, wait_routable=False, health_interval=0.05, admin_token="t")
    good = cluster.upstream(cluster.prefill_urls[0])
    await cluster.wait_for(lambda: good.routable, 3)
    # A decode server listed as a prefill one: healthy, but its /get_server_info says it is no P.
    wrong, wrong_runner, wrong_url = await start_mock(MockConfig(role="decode", protocol="sglang"))
    cluster.engine_runners[id(wrong)] = wrong_runner
    headers = {"Authorization": "Bearer t"}
    async with http.post(cluster.url + "/admin/upstreams", json={"role": "prefill", "url": wrong_url},
                         headers=headers) as resp:
        assert resp.status in (200, 201), await resp.text()
    added = cluster.upstream(wrong_url)
    await cluster.wait_for(lambda: added.meta_error not in (None, PENDING), 3)
    assert "not a prefill server" in (added.meta_error or "") and not added.routable
    async with http.get(cluster.url + "/health?verbose=1", headers=headers) as resp:  # the topology: admin only
        listed = {u["url"]: u for u in (await resp.json())["upstreams"]}
    assert listed[wrong_url]["meta_error"] == added.meta_error and listed[good.url]["meta_error"] is None
    async with http.get(cluster.url + "/admin/upstreams", headers=headers) as resp:
        text = await resp.text()
    assert "not a prefill server" in text
    for _ in range(4):  # every request goes to the P whose metadata is known
        status, _ = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
        assert status == 200
    assert wrong.requests == [] and len(cluster.prefill[0].requests) == 4


@pytest.mark.parametrize("adapter", ["mooncake", "nixl-push"])
async def test_a_p_without_metadata_gets_no_traffic(pd: Factory, http: aiohttp.ClientSession, adapter: str) -> None:
    # Mooncake: the bootstrap port named is closed; NIXL push: no engine id given.
    port = int(closed_port_url().rsplit(":", 1)[1])
    cluster = await pd(adapter, n_prefill=1, wait_routable=False,
                       meta=lambda url: {url: {"bootstrap_port": port}} if adapter == "mooncake" else {})
    upstream = cluster.upstream(cluster.prefill_urls[0])
    await cluster.wait_for(lambda: upstream.meta_error != PENDING, 3)
    expected = f"127.0.0.1:{port}/query" if adapter == "mooncake" else "needs this server's NIXL engine_id"
    assert expected in (upstream.meta_error or "") and not upstream.routable
    status, raw = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
    assert status == 503 and b"no routable prefill upstream" in raw
    assert cluster.prefill[0].requests == [] and cluster.decode[0].requests == []
    async with http.get(cluster.url + "/health?verbose=1") as resp:
        assert resp.status == 503
        [listed] = [u for u in (await resp.json())["upstreams"] if u["role"] == "prefill"]
    assert listed["meta_error"] == upstream.meta_error


# ---------------------------------------------------------------- --pd-min-prompt-tokens


@pytest.mark.parametrize("adapter", ["mooncake", "nixl-push"])
async def test_a_short_prompt_goes_to_d_alone_without_params(pd: Factory, http: aiohttp.ClientSession,
                                                             adapter: str) -> None:
    """D alone gets a plain request: vLLM's consumer then computes the prompt itself."""
    cluster = await pd(adapter, n_prefill=1, pd_min_prompt_tokens=1000)
    body = {**request_body("/v1/completions", True), **FORGED}
    status, raw = await read_all(http, cluster.url + "/v1/completions", body)
    assert status == 200 and sse_events(raw)[-1] == b"[DONE]"
    assert cluster.prefill[0].requests == []
    [d_req] = cluster.decode[0].requests
    assert d_req.body == request_body("/v1/completions", True)
    assert cluster.decode[0].stats.decodes_without_handle == 1
    assert cluster.metric("pdproxy_pd_skipped_total", reason="short_prompt") == 1


# ---------------------------------------------------------------- blame when both legs fail


async def test_d_failing_because_its_p_failed_is_blamed_on_p(cluster_factory: Any, http: aiohttp.ClientSession,
                                                             serve_app: Callable[[web.Application],
                                                                                 Awaitable[str]]) -> None:
    """D answers 503 first, its P fails a moment later (within the grace): D could not get P's KV, so P
    is blamed, D's call counts as kv_lost, and the request fails over to the next P."""
    d_failed = asyncio.Event()
    calls = {"p1": 0, "d": 0}
    answer = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": " ok",
                                                                   "finish_reason": "length"}]}

    async def p1(request: web.Request) -> web.Response:
        calls["p1"] += 1
        await request.read()
        await asyncio.wait_for(d_failed.wait(), 2)
        return web.json_response({"error": {"message": "bootstrap failed"}}, status=500)

    async def p2(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(answer)

    async def d(request: web.Request) -> web.Response:
        calls["d"] += 1
        await request.read()
        if calls["d"] == 1:
            d_failed.set()
            return web.json_response({"error": {"message": "KV transfer failed"}}, status=503)
        return web.json_response(answer)

    urls = []
    for handler in (p1, p2, d):
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        urls.append(await serve_app(app))
    cluster = await cluster_factory(0, 0, extra_prefill=tuple(urls[:2]), extra_decode=(urls[2],), kv_adapter="sglang",
                                    handoff_meta={u: {"bootstrap_port": 9} for u in urls[:2]}, health_interval=0,
                                    prefill_policy="round_robin")
    await cluster.wait_for(lambda: all(u.routable for u in cluster.flow.prefill_pool.members), 3)
    status, raw = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
    assert status == 200, raw
    assert calls == {"p1": 1, "d": 2}
    assert outcomes(cluster, urls[0], "prefill") == {"bad_status": 1}
    assert outcomes(cluster, urls[2], "decode") == {"kv_lost": 1, "ok": 1}
    assert cluster.upstream(urls[2]).last_error is None
    assert cluster.metric("pdproxy_prefill_retries_total") == 1 and cluster.metric("pdproxy_flow_retries_total") == 0


async def test_without_health_checks_an_admin_added_p_is_routable_once_its_metadata_is_in(
    pd: Factory, http: aiohttp.ClientSession
) -> None:
    cluster = await pd("sglang", n_prefill=1, health_interval=0, admin_token="t", prefill_policy="round_robin")
    extra, runner, url = await start_mock(MockConfig(role="prefill", protocol="sglang"))
    cluster.engine_runners[id(extra)] = runner
    async with http.post(cluster.url + "/admin/upstreams", json={"role": "prefill", "url": url},
                         headers={"Authorization": "Bearer t"}) as resp:
        assert resp.status in (200, 201), await resp.text()
    added = cluster.upstream(url)
    await cluster.wait_for(lambda: added.routable, 3)
    assert added.meta == {"bootstrap_port": extra.bootstrap_port}
    for _ in range(2):  # round robin: one request on each P
        status, _ = await read_all(http, cluster.url + "/v1/completions", request_body("/v1/completions", False))
        assert status == 200
    assert len(extra.requests) == 1 and len(cluster.prefill[0].requests) == 1


# ---------------------------------------------------------------- P's usage and P's span

REPEATED = " ".join(f"w{i}" for i in range(40))  # 2 whole blocks of 16 words, and 8 more
CACHED_ON_REPEAT = 32  # the mock P's prefix cache on the second time: the 2 whole blocks


def usage_of(raw: bytes, stream: bool) -> dict[str, Any]:
    if not stream:
        return orjson.loads(raw)["usage"]  # type: ignore[no-any-return]
    return next(orjson.loads(e)["usage"] for e in sse_events(raw) if e != b"[DONE]" and b'"usage"' in e)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_cached_tokens_are_what_p_found_not_what_d_received(pd: Factory, http: aiohttp.ClientSession,
                                                                  adapter: str, stream: bool) -> None:
    """D got the whole prompt by transfer and counts it all as cached; the client hears P's own prefix-cache hit
    (read from P's answer, JSON or SGLang's stream), and the P-side metric counts it."""
    cluster = await pd(adapter, n_prefill=1)
    body = {"model": "mock", "prompt": REPEATED, "max_tokens": 2, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    seen = []
    for _ in range(2):
        status, raw = await read_all(http, cluster.url + "/v1/completions", body)
        assert status == 200, raw
        seen.append(usage_of(raw, stream))
    assert cluster.decode[0].stats.decodes_with_valid_handle == 2
    assert seen[0]["prompt_tokens"] == 40
    assert [u["prompt_tokens_details"] for u in seen] == [{"cached_tokens": 0}, {"cached_tokens": CACHED_ON_REPEAT}]
    assert cluster.metric("pdproxy_prefill_cached_prompt_tokens_total") == CACHED_ON_REPEAT


async def usage_cluster(cluster_factory: Any, serve_app: Callable[[web.Application], Awaitable[str]],
                        p: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        d: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Cluster:
    urls = []
    for handler in (p, d):
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        urls.append(await serve_app(app))
    cluster = await cluster_factory(0, 0, extra_prefill=(urls[0],), extra_decode=(urls[1],), kv_adapter="sglang",
                                    handoff_meta={urls[0]: {"bootstrap_port": 9}}, health_interval=0)
    await cluster.wait_for(lambda: all(u.routable for u in cluster.flow.prefill_pool.members), 3)
    return cluster


def usage_event(cached: int) -> bytes:
    return b'data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":1,"total_tokens":41,' \
           b'"prompt_tokens_details":{"cached_tokens":%d}}}\n\n' % cached


async def test_d_s_usage_waits_for_p_s_answer_and_only_the_usage_waits(
        cluster_factory: Any, http: aiohttp.ClientSession,
        serve_app: Callable[[web.Application], Awaitable[str]]) -> None:
    """D's usage chunk comes before P answered: the tokens before it reach the client at once, the usage is held
    until P's answer is in, then written with P's count (D said the whole prompt)."""
    token_seen, d_done = asyncio.Event(), asyncio.Event()

    async def p(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.wait_for(d_done.wait(), 2)  # P answers only once D sent everything
        return web.json_response({"choices": [{"text": "x"}], "usage": {
            "prompt_tokens": 40, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 7}}})

    async def d(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"text":" a"}],"usage":null}\n\n')
        await asyncio.wait_for(token_seen.wait(), 2)
        # the field split over two writes: the hold starts at its first byte
        await resp.write(usage_event(40)[:60])
        await resp.write(usage_event(40)[60:] + b"data: [DONE]\n\n")
        d_done.set()
        await resp.write_eof()
        return resp

    cluster = await usage_cluster(cluster_factory, serve_app, p, d)
    body = {"model": "m", "prompt": "p", "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2)  # before P answered
        assert b'" a"' in first
        token_seen.set()
        raw = first + await resp.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]" and len(events) == 3
    assert orjson.loads(events[1])["usage"]["prompt_tokens_details"] == {"cached_tokens": 7}
    assert cluster.metric("pdproxy_prefill_cached_prompt_tokens_total") == 7
    assert outcomes(cluster, cluster.prefill_urls[0], "prefill") == {"ok": 1}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_p_that_does_not_answer_within_the_grace_leaves_d_s_count(
        cluster_factory: Any, http: aiohttp.ClientSession,
        serve_app: Callable[[web.Application], Awaitable[str]], stream: bool) -> None:
    """P still silent when D's usage is due and the grace passes: D's usage goes out as D wrote it, the request
    ends, and P's call is cancelled (never a failure)."""
    client_done = asyncio.Event()

    async def p(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.wait_for(client_done.wait(), 3)
        return web.json_response({"usage": {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 7}}})

    async def d(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not stream:
            return web.json_response({"choices": [{"index": 0, "text": " a"}], "usage": {
                "prompt_tokens": 40, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 40}}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(usage_event(40) + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    cluster = await usage_cluster(cluster_factory, serve_app, p, d)
    cluster.flow._flow.__self__.usage_grace = 0.1  # type: ignore[attr-defined]
    body: dict[str, Any] = {"model": "m", "prompt": "p", "max_tokens": 1, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    status, raw = await asyncio.wait_for(read_all(http, cluster.url + "/v1/completions", body), 2)
    client_done.set()
    assert status == 200
    assert usage_of(raw, stream)["prompt_tokens_details"] == {"cached_tokens": 40}
    await asyncio.wait_for(cluster.flow.wait_idle(), 2)
    assert outcomes(cluster, cluster.prefill_urls[0], "prefill") == {"cancelled": 1}
    assert cluster.metric("pdproxy_prefill_cached_prompt_tokens_total") == 0


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_each_p_attempt_is_a_prefill_span_and_p_s_call_carries_it(pd: Factory, http: aiohttp.ClientSession,
                                                                        adapter: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from pdproxy.tracing import OtelTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cluster = await pd(adapter, n_prefill=2, prefill_policy="round_robin", tracing=OtelTracing(provider))
    cluster.prefill[0].fail_next(500)  # round robin starts on it: the first attempt fails, the second is P 1's
    body = request_body("/v1/completions", True)
    status, raw = await read_all(http, cluster.url + "/v1/completions", body)
    assert status == 200, raw
    await asyncio.wait_for(cluster.flow.wait_idle(), 2)  # the request's span ends as its handler does
    spans: dict[str, list[Any]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    (request,) = spans["pdproxy.request"]
    attempts = sorted(spans["pdproxy.prefill"], key=lambda s: s.attributes["pdproxy.attempt"])
    assert [s.attributes["pdproxy.attempt"] for s in attempts] == [0, 1]
    assert [s.attributes["pdproxy.outcome"] for s in attempts] == ["bad_status", "ok"]
    assert attempts[0].status.status_code is StatusCode.ERROR and attempts[1].status.status_code is not StatusCode.ERROR
    for span in attempts:
        assert span.kind is SpanKind.CLIENT and span.parent.span_id == request.context.span_id
        assert span.attributes["pdproxy.hedge"] is False
        assert request.start_time <= span.start_time <= span.end_time <= request.end_time
    assert {s.attributes["pdproxy.upstream"] for s in attempts} == set(cluster.prefill_urls)
    # each P call carries its own attempt's span, as the sequential flow's P calls do
    parents = {r.header("traceparent").split("-")[2] for r in requests_of(cluster.prefill)}
    assert parents == {format(s.context.span_id, "016x") for s in attempts}
    legs = spans["pdproxy.decode.first_byte"]  # each attempt's D call too, the first one cancelled with its P
    assert sorted(s.attributes["pdproxy.outcome"] for s in legs) == ["cancelled", "ok"]
    assert all(s.parent.span_id == request.context.span_id for s in legs)
