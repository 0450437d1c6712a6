"""The mock engine's PD protocols, driven by each handoff's own plan over real HTTP (no proxy yet).

Each test runs what an orchestrator would: the plan's P and D calls, sequentially or at once. The
SGLang tests show why the concurrent plan exists: P answers only once D took the room's KV, so a
client that waits for P first fails (after the mock's bounded bootstrap timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from pdproxy.client import ClientOptions, UpstreamClient
from pdproxy.handoff.base import UpstreamCall
from pdproxy.handoff.discovery import MetadataRefresher, client_fetch_json
from pdproxy.handoff.omni import OmniHandoff
from pdproxy.handoff.sglang import SglangHandoff
from pdproxy.handoff.vllm_mooncake import MooncakeHandoff
from pdproxy.mock import MockConfig, MockEngine, start_mock
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

KV_TIMEOUT_MS = 300.0
Start = Callable[..., Awaitable[tuple[MockEngine, str]]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def _start(**config: Any) -> tuple[MockEngine, str]:
        config.setdefault("kv_timeout_ms", KV_TIMEOUT_MS)
        engine, runner, url = await start_mock(MockConfig(**config))
        runners.append(runner)
        return engine, url

    yield _start
    for runner in runners:
        await runner.cleanup()


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": "tell me about rooms"}],
            "max_tokens": 4, "stream": stream, **extra}


def request(body: dict[str, Any], rid: str = "req-1") -> ProxyRequest:
    return ProxyRequest("/v1/chat/completions", body, bool(body.get("stream")), rid, {"X-Request-Id": rid})


async def call(http: aiohttp.ClientSession, base: str, leg: UpstreamCall, rid: str = "req-1") -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "X-Request-Id": rid}
    for line in leg.headers.decode().split("\r\n"):
        if line:
            name, value = line.split(": ", 1)
            headers[name] = value
    async with http.post(base + leg.path, data=leg.body, headers=headers) as resp:
        return resp.status, await resp.read()


async def discovered(handoff: Any, role: Role, url: str, http: aiohttp.ClientSession) -> Upstream:
    upstream = Upstream(role, url)
    client = UpstreamClient(ClientOptions(connect_timeout=1.0))
    try:
        refresher = MetadataRefresher(handoff, client_fetch_json(client, 1.0))
        refresher.prepare(upstream)
        await asyncio.wait_for(refresher.refresh(upstream), 2)
    finally:
        await client.close()
    return upstream


# ---------------------------------------------------------------- sglang


async def sglang_pair(start: Start, http: aiohttp.ClientSession) -> tuple[MockEngine, MockEngine, Upstream, Upstream]:
    p, p_url = await start(role="prefill", protocol="sglang")
    d, d_url = await start(role="decode", protocol="sglang")
    prefill = await discovered(SglangHandoff(), Role.PREFILL, p_url, http)
    return p, d, prefill, Upstream(Role.DECODE, d_url)


async def test_sglang_discovery_reads_the_bootstrap_port_from_server_info(start: Start, http: Any) -> None:
    p, _, prefill, _ = await sglang_pair(start, http)
    assert p.bootstrap_port and prefill.meta == {"bootstrap_port": p.bootstrap_port}
    assert prefill.routable
    _d, d_url = await start(role="decode", protocol="sglang")
    wrong = await discovered(SglangHandoff(), Role.PREFILL, d_url, http)  # a D listed as a P
    assert not wrong.routable and "not a prefill server" in (wrong.meta_error or "")


@pytest.mark.parametrize("stream", [False, True])
async def test_sglang_both_legs_at_once_moves_the_kv(start: Start, http: Any, stream: bool) -> None:
    p, d, prefill, decode = await sglang_pair(start, http)
    plan = SglangHandoff().plan(request(chat(stream)), prefill, decode)
    (p_status, p_body), (d_status, d_body) = await asyncio.wait_for(asyncio.gather(
        call(http, prefill.url, plan.prefill), call(http, decode.url, plan.decode(None)[0])), 2)
    plan.close()
    assert (p_status, d_status) == (200, 200)
    assert p_body.count(b" tok") == 1 and d_body.count(b" tok") == 4  # P makes the first token only
    assert d.stats.decodes_with_valid_handle == 1 and d.stats.decodes_with_invalid_handle == 0
    assert p.stats.prefills == 1 and len(p.kv_board) == 0
    assert (b"data: [DONE]" in d_body) is stream
    assert p.requests[0].body == d.requests[0].body  # the same body to both


async def test_sglang_sequential_client_deadlocks_until_the_bootstrap_timeout(start: Start, http: Any) -> None:
    p, d, prefill, decode = await sglang_pair(start, http)
    plan = SglangHandoff().plan(request(chat()), prefill, decode)
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, body = await asyncio.wait_for(call(http, prefill.url, plan.prefill), 2)  # P first, as `vllm` does
    waited = loop.time() - began
    assert status == 500 and b"no decode server took bootstrap room" in body
    assert waited >= KV_TIMEOUT_MS / 1000 * 0.9  # P held the answer until its timeout: D was never called
    assert d.stats.decodes == 0 and len(p.kv_board) == 0


async def test_sglang_decode_alone_waits_then_fails(start: Start, http: Any) -> None:
    _, d, prefill, decode = await sglang_pair(start, http)
    plan = SglangHandoff().plan(request(chat()), prefill, decode)
    status, body = await asyncio.wait_for(call(http, decode.url, plan.decode(None)[0]), 2)
    assert status == 500 and b"KV transfer failed" in body
    assert d.stats.decodes_with_invalid_handle == 1 and d.stats.in_flight == 0


async def test_sglang_prefill_aborted_fails_the_waiting_decode_at_once(start: Start, http: Any) -> None:
    p, _d, prefill, decode = await sglang_pair(start, http)
    p.config.ttft_ms = 5000  # P still computing when the client goes
    plan = SglangHandoff().plan(request(chat()), prefill, decode)
    p_leg = asyncio.ensure_future(call(http, prefill.url, plan.prefill))
    d_leg = asyncio.ensure_future(call(http, decode.url, plan.decode(None)[0]))
    await p.wait_for_requests(1)
    await p.wait_until(lambda s: s.kv_fetches == 1, 2)  # D waits on P's bootstrap server
    began = asyncio.get_running_loop().time()
    p_leg.cancel()  # the proxy's P leg is cut: P aborts the room
    await p.wait_until(lambda s: s.aborted == 1, 2)
    status, body = await asyncio.wait_for(d_leg, 1)
    assert asyncio.get_running_loop().time() - began < KV_TIMEOUT_MS / 1000 / 2  # told, not timed out
    assert status == 500 and b"KV transfer failed" in body
    assert len(p.kv_board) == 0


async def test_sglang_engines_reject_requests_without_a_room(start: Start, http: Any) -> None:
    _, p_url = await start(role="prefill", protocol="sglang")
    async with http.post(p_url + "/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 400 and "bootstrap_host" in (await resp.json())["error"]["message"]
    async with http.post(p_url + "/v1/chat/completions",
                         json=chat(bootstrap_host="127.0.0.1", bootstrap_room=[1, 2])) as resp:
        assert resp.status == 400 and "2 entries" in (await resp.json())["error"]["message"]


# ---------------------------------------------------------------- omni


async def test_omni_sequential_handoff_against_the_mock(start: Start, http: Any) -> None:
    p, p_url = await start(role="prefill", protocol="omni")
    d, d_url = await start(role="decode", protocol="omni")
    plan = OmniHandoff().plan(request(chat(True)), Upstream(Role.PREFILL, p_url), Upstream(Role.DECODE, d_url))
    status, raw = await call(http, p_url, plan.prefill)
    answer = orjson.loads(raw)
    assert status == 200 and "kv_transfer_params" not in p.requests[0].body
    assert set(answer["kv_transfer_params"]) >= {"remote_block_ids", "remote_cluster_id", "remote_host_ip"}
    leg, has_handle = plan.decode(answer)
    status, body = await call(http, d_url, leg)
    assert status == 200 and has_handle and b"data: [DONE]" in body
    assert d.stats.decodes_with_valid_handle == 1


async def test_omni_prefill_stopped_before_the_length_cap_returns_no_params(start: Start, http: Any) -> None:
    _, p_url = await start(role="prefill", protocol="omni", eos_after=1)
    d, d_url = await start(role="decode", protocol="omni")
    plan = OmniHandoff().plan(request(chat()), Upstream(Role.PREFILL, p_url), Upstream(Role.DECODE, d_url))
    answer = orjson.loads((await call(http, p_url, plan.prefill))[1])
    assert answer["choices"][0]["finish_reason"] == "stop" and "kv_transfer_params" not in answer
    leg, has_handle = plan.decode(answer)
    assert has_handle is False
    assert (await call(http, d_url, leg))[0] == 200
    assert d.stats.decodes_without_handle == 1


# ---------------------------------------------------------------- mooncake


async def mooncake_pair(start: Start, http: Any, dp_size: int = 1) -> tuple[MockEngine, MockEngine, Upstream,
                                                                            Upstream, MooncakeHandoff]:
    p, p_url = await start(role="prefill", protocol="mooncake", dp_size=dp_size)
    d, d_url = await start(role="decode", protocol="mooncake")
    handoff = MooncakeHandoff({p_url: {"bootstrap_port": p.bootstrap_port}})
    prefill = await discovered(handoff, Role.PREFILL, p_url, http)
    return p, d, prefill, Upstream(Role.DECODE, d_url), handoff


async def test_mooncake_discovery_reads_query(start: Start, http: Any) -> None:
    p, _, prefill, _, _ = await mooncake_pair(start, http, dp_size=2)
    assert prefill.meta == {"bootstrap_addr": f"http://127.0.0.1:{p.bootstrap_port}",
                            "engine_ids": [(0, p.engine_ids[0]), (1, p.engine_ids[1])]}
    assert p.bootstrap is not None and p.bootstrap.queries == 1


async def test_mooncake_discovery_failure_keeps_p_unroutable(start: Start, http: Any) -> None:
    _, p_url = await start(role="prefill", protocol="mooncake")
    prefill = await discovered(MooncakeHandoff(), Role.PREFILL, p_url, http)  # default port 8998: nothing there
    assert not prefill.routable and "/query" in (prefill.meta_error or "")


@pytest.mark.parametrize("stream", [False, True])
async def test_mooncake_concurrent_legs_over_dp_ranks(start: Start, http: Any, stream: bool) -> None:
    p, d, prefill, decode, handoff = await mooncake_pair(start, http, dp_size=2)
    for i in range(2):  # rank 0, then rank 1
        plan = handoff.plan(request(chat(stream), f"r{i}"), prefill, decode)
        (p_status, p_raw), (d_status, _) = await asyncio.wait_for(asyncio.gather(
            call(http, prefill.url, plan.prefill, f"r{i}"), call(http, decode.url, plan.decode(None)[0], f"r{i}")), 2)
        assert (p_status, d_status) == (200, 200)
        assert "kv_transfer_params" not in orjson.loads(p_raw)  # Mooncake's P answers no params
    assert [r.header("X-data-parallel-rank") for r in p.requests] == ["0", "1"]
    assert d.stats.decodes_with_valid_handle == 2 and len(p.kv_board) == 0


async def test_mooncake_decode_waits_for_a_prefill_that_comes_late(start: Start, http: Any) -> None:
    _p, d, prefill, decode, handoff = await mooncake_pair(start, http)
    plan = handoff.plan(request(chat()), prefill, decode)
    d_leg = asyncio.ensure_future(call(http, decode.url, plan.decode(None)[0]))
    await d.wait_for_requests(1)
    assert not d_leg.done()
    assert (await call(http, prefill.url, plan.prefill))[0] == 200
    assert (await asyncio.wait_for(d_leg, 2))[0] == 200
    assert d.stats.decodes_with_valid_handle == 1


async def test_mooncake_decode_without_its_prefill_fails_after_the_timeout(start: Start, http: Any) -> None:
    _, _d, prefill, decode, handoff = await mooncake_pair(start, http)
    plan = handoff.plan(request(chat()), prefill, decode)
    status, body = await asyncio.wait_for(call(http, decode.url, plan.decode(None)[0]), 2)
    assert status == 500 and b"KV transfer failed" in body  # why the orchestrator must cancel D when P fails


async def test_mooncake_prefill_without_transfer_id_holds_no_kv(start: Start, http: Any) -> None:
    p, p_url = await start(role="prefill", protocol="mooncake")
    body = {**chat(), "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    async with http.post(p_url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
    assert len(p.kv_board) == 0
    async with http.post(p_url + "/v1/chat/completions", json=chat(), headers={"X-data-parallel-rank": "3"}) as resp:
        assert resp.status == 400  # no do_remote_decode: not a prefill request


# ---------------------------------------------------------------- nixl-push


async def push_pair(start: Start, http: Any) -> tuple[MockEngine, MockEngine, Upstream, Upstream, Any]:
    from pdproxy.handoff.vllm_nixl_push import NixlPushHandoff

    p, p_url = await start(role="prefill", protocol="nixl-push", engine_id="pf-1")
    d, d_url = await start(role="decode", protocol="nixl-push")
    handoff = NixlPushHandoff({p_url: {"engine_id": "pf-1", "side_channel_port": p.bootstrap_port}})
    prefill = await discovered(handoff, Role.PREFILL, p_url, http)
    return p, d, prefill, Upstream(Role.DECODE, d_url), handoff


@pytest.mark.parametrize("stream", [False, True])
async def test_nixl_push_concurrent_legs(start: Start, http: Any, stream: bool) -> None:
    p, d, prefill, decode, handoff = await push_pair(start, http)
    assert prefill.routable and prefill.meta["side_channel_port"] == p.bootstrap_port
    plan = handoff.plan(request(chat(stream), "rid-7"), prefill, decode)
    (p_status, p_raw), (d_status, _) = await asyncio.wait_for(asyncio.gather(
        call(http, prefill.url, plan.prefill, "rid-7"), call(http, decode.url, plan.decode(None)[0], "rid-7")), 2)
    assert (p_status, d_status) == (200, 200)
    assert orjson.loads(p_raw)["kv_transfer_params"]["transfer_mode"] == "push"
    assert d.stats.decodes_with_valid_handle == 1 and len(p.kv_board) == 0


async def test_nixl_push_legs_with_different_request_ids_never_pair(start: Start, http: Any) -> None:
    _, _d, prefill, decode, handoff = await push_pair(start, http)
    plan = handoff.plan(request(chat(), "rid-1"), prefill, decode)
    (p_status, _), (d_status, d_body) = await asyncio.wait_for(asyncio.gather(
        call(http, prefill.url, plan.prefill, "rid-1"), call(http, decode.url, plan.decode(None)[0], "rid-2")), 2)
    assert p_status == 200 and d_status == 500 and b"KV transfer failed" in d_body


async def test_nixl_push_decode_without_p_coordinates_is_rejected(start: Start, http: Any) -> None:
    _, d_url = await start(role="decode", protocol="nixl-push")
    body = {**chat(), "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": "pf-1"}}
    async with http.post(d_url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 400 and "remote_host" in (await resp.json())["error"]["message"]
