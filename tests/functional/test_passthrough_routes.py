"""Routes beyond PD: passed through byte for byte to a pool, with failover before the first byte, the
Responses API's GET/cancel by id reaching the server that made the answer, and vLLM's tokens-in API through PD."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from pdproxy.app import build_app, start_server
from pdproxy.mock import MockConfig
from pdproxy.settings import Settings
from tests.conftest import Cluster, ClusterFactory, closed_port_url, sse_events

PROMPT = "the quick brown fox jumps over the lazy dog"

# route, body, what the answer must hold (a key whose value the mock computes from the body)
POOLING_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/embeddings", {"model": "mock", "input": ["a b", "c"]}, "data"),
    ("/pooling", {"model": "mock", "input": "a b c"}, "data"),
    ("/v1/score", {"model": "mock", "text_1": "a b", "text_2": ["a", "z"]}, "data"),
    ("/score", {"model": "mock", "text_1": "a b", "text_2": ["a", "z"]}, "data"),
    ("/v1/rerank", {"model": "mock", "query": "fox", "documents": ["a fox", "a dog"]}, "results"),
    ("/rerank", {"model": "mock", "query": "fox", "documents": ["a fox", "a dog"]}, "results"),
    ("/v2/rerank", {"model": "mock", "query": "fox", "documents": ["a fox", "a dog"]}, "results"),
    ("/tokenize", {"model": "mock", "prompt": "hello 7 world"}, "tokens"),
    ("/detokenize", {"model": "mock", "tokens": [7, 8]}, "prompt"),
    ("/v1/messages", {"model": "mock", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}, "content"),
    ("/v1/responses", {"model": "mock", "input": "hi there", "max_output_tokens": 3}, "usage"),
]


async def direct(http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url + path, json=body) as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("path", "body", "key"), POOLING_CASES, ids=[c[0] for c in POOLING_CASES])
async def test_each_route_reaches_a_decode_server_and_answers_as_the_engine(
        cluster: Cluster, http: aiohttp.ClientSession, path: str, body: dict[str, Any], key: str) -> None:
    async with http.post(cluster.url + path, json=body, headers={"X-Request-Id": "r1"}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-Id"] == "r1"
        answer = await resp.json()
    expected = await direct(http, cluster.decode_urls[0], path, body)  # the mock is deterministic but for ids
    assert answer[key] == expected[key]
    recorded = [r for r in cluster.decode[0].requests if r.path == path]
    assert recorded[0].body == body and recorded[0].header("X-Request-Id") == "r1"
    assert not any(e.requests for e in cluster.prefill)
    await cluster.assert_no_leaks()
    assert cluster.metric("pdproxy_requests_total", endpoint=path, status="200") == 1


async def test_detokenize_gives_back_what_tokenize_made(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    tokens = (await direct(http, cluster.url, "/tokenize", {"prompt": PROMPT}))["tokens"]
    assert len(tokens) == len(PROMPT.split())
    assert (await direct(http, cluster.url, "/detokenize", {"tokens": tokens}))["prompt"] == PROMPT


async def test_the_body_and_the_answer_go_through_byte_for_byte(cluster_factory: ClusterFactory, serve_app: Any,
                                                                http: aiohttp.ClientSession) -> None:
    seen: list[tuple[bytes, Any]] = []

    async def echo(request: web.Request) -> web.Response:
        raw = await request.read()
        seen.append((raw, request.headers.copy()))
        return web.Response(body=b'{ "echo" :  ' + raw + b"}", content_type="application/json",
                            headers={"X-Request-Id": "engine-own"})

    app = web.Application()
    app.router.add_post("/v1/embeddings", echo)
    url = await serve_app(app)
    cluster = await cluster_factory(n_decode=0, extra_decode=(url,))
    raw = b'{"input" : [1,2,  3], "model":"m",\n "z": 1e3}'
    async with http.post(cluster.url + "/v1/embeddings?x=1", data=raw,
                         headers={"Content-Type": "application/json; charset=utf-8", "Authorization": "Bearer k",
                                  "X-Request-Id": "b1"}) as resp:
        assert resp.status == 200
        assert await resp.read() == b'{ "echo" :  ' + raw + b"}"
        assert resp.headers["X-Request-Id"] == "b1"
    body, headers = seen[0]
    assert body == raw
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Authorization"] == "Bearer k"
    assert headers["X-Request-Id"] == "b1"


async def test_a_route_can_be_sent_to_the_prefill_pool(cluster_factory: ClusterFactory,
                                                       http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1, route_pools="/v1/embeddings=prefill,/tokenize=prefill")
    await direct(http, cluster.url, "/v1/embeddings", {"input": "a"})
    await direct(http, cluster.url, "/v1/score", {"text_1": "a", "text_2": "a"})
    assert [r.path for r in cluster.prefill[0].requests] == ["/v1/embeddings"]
    assert [r.path for r in cluster.decode[0].requests] == ["/v1/score"]


def test_an_unknown_route_in_route_pools_stops_the_start() -> None:
    with pytest.raises(ValueError, match="unknown route"):
        Settings(prefill_servers="http://127.0.0.1:1", decode_servers="http://127.0.0.1:2",
                 route_pools="/v1/nothing=prefill")


async def test_a_5xx_before_the_first_byte_fails_over_to_another_server(cluster_factory: ClusterFactory,
                                                                        http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin")
    failing, good = cluster.decode
    failing.fail_next(503, times=2)
    for _ in range(2):  # round robin: one of the two requests starts on the failing server
        assert (await direct(http, cluster.url, "/v1/embeddings", {"input": "a"}))["data"]
    tried = len(failing.requests)
    assert tried >= 1 and len(good.requests) == 2
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=cluster.decode_urls[0],
                          outcome="bad_status") == tried


async def test_a_connect_error_fails_over_and_every_server_down_is_a_502(cluster_factory: ClusterFactory,
                                                                          http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(extra_decode=(closed_port_url(),), decode_policy="round_robin")
    for _ in range(2):
        assert (await direct(http, cluster.url, "/tokenize", {"prompt": "a b"}))["count"] == 2
    down = await cluster_factory(n_decode=0, extra_decode=(closed_port_url(), closed_port_url()))
    async with http.post(down.url + "/tokenize", json={"prompt": "a"}) as resp:
        assert resp.status == 502
        assert "cannot connect to decode upstream" in (await resp.json())["error"]["message"]


async def test_a_timeout_is_not_retried(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2, decode_first_byte_timeout=0.3)
    for engine in cluster.decode:
        engine.hang_next(times=2)
    async with http.post(cluster.url + "/v1/messages", json={"max_tokens": 1, "messages": []}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["type"]
    assert sum(len(e.requests) for e in cluster.decode) == 1  # the request may be running: never sent twice
    assert cluster.metric("pdproxy_timeouts_total", stage="decode_first_byte") == 1


async def test_a_4xx_is_relayed_unchanged_and_not_retried(cluster_factory: ClusterFactory,
                                                          http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2)
    async with http.post(cluster.url + "/v1/rerank", json={"documents": ["a"]}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "query" and error["code"] == 400
    assert sum(len(e.requests) for e in cluster.decode) == 1


async def test_an_unknown_route_is_a_clear_404(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.post(cluster.url + "/v1/nothing", json={}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["message"] == "unknown route: POST /v1/nothing" and error["type"] == "invalid_request_error"
    async with http.get(cluster.url + "/v1/embeddings") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"


async def test_draining_refuses_pass_through_requests(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    cluster.flow.start_drain()
    async with http.post(cluster.url + "/tokenize", json={"prompt": "a"}) as resp:
        assert resp.status == 503
    assert not cluster.decode[0].requests


# -- admission: the same slots, queue and 503s as PD requests ------------------------------


async def until_waiting(cluster: Cluster, count: int) -> None:
    """Wait (bounded) until `count` requests wait for a slot; the queue announces no event to wait on."""
    deadline = asyncio.get_running_loop().time() + 2
    while cluster.flow.admission.waiting != count:
        assert asyncio.get_running_loop().time() < deadline, f"{cluster.flow.admission.waiting} waiting, not {count}"
        await asyncio.sleep(0.01)


async def hold_the_only_slot(cluster: Cluster) -> tuple[aiohttp.ClientSession, asyncio.Future[Any]]:
    """An embeddings request the engine never answers: it holds the one slot until its client leaves."""
    engine = cluster.decode[0]
    engine.hang_next()
    session = aiohttp.ClientSession()
    held = asyncio.ensure_future(session.post(cluster.url + "/v1/embeddings", json={"model": "mock", "input": "a"}))
    await engine.wait_for_requests(1)
    return session, held


async def test_a_held_pass_through_request_makes_the_next_ones_queue(cluster_factory: ClusterFactory,
                                                                     http: aiohttp.ClientSession) -> None:
    """--max-concurrency 1: while an embeddings request holds the slot, a /tokenize and a PD request wait in the
    queue (nothing reaches an engine); once the holder's client leaves, both are served."""
    cluster = await cluster_factory(n_prefill=1, max_concurrency=1)
    session, held = await hold_the_only_slot(cluster)
    tokenize = asyncio.ensure_future(http.post(cluster.url + "/tokenize", json={"prompt": "a b"}))
    await until_waiting(cluster, 1)
    completion = asyncio.ensure_future(http.post(cluster.url + "/v1/completions",
                                                 json={"model": "mock", "prompt": "a", "max_tokens": 1}))
    await until_waiting(cluster, 2)
    assert len(cluster.decode[0].requests) == 1 and not cluster.prefill[0].requests  # both still wait
    held.cancel()
    await session.close()
    for waiting in (tokenize, completion):
        async with await asyncio.wait_for(waiting, 2) as resp:
            assert resp.status == 200, await resp.text()
    assert [r.path for r in cluster.decode[0].requests] == ["/v1/embeddings", "/tokenize", "/v1/completions"]
    await cluster.assert_no_leaks()
    assert cluster.flow.admitted == 0 and cluster.flow.admission.waiting == 0
    assert cluster.metric("pdproxy_client_disconnects_total", stage="decode") == 1


@pytest.mark.parametrize(("reason", "settings"), [("full", {"queue_size": 0}), ("timeout", {"queue_timeout": 0.1})])
async def test_a_pass_through_request_without_a_slot_is_a_503_as_a_pd_one(
        cluster_factory: ClusterFactory, http: aiohttp.ClientSession, reason: str, settings: dict[str, Any]) -> None:
    cluster = await cluster_factory(n_prefill=1, max_concurrency=1, **settings)
    session, held = await hold_the_only_slot(cluster)
    try:
        async with http.post(cluster.url + "/tokenize", json={"prompt": "a"}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            error = (await resp.json())["error"]
        assert "pdproxy is at capacity" in error["message"] and error["code"] == 503
        assert len(cluster.decode[0].requests) == 1  # never sent
        assert cluster.metric("pdproxy_queue_rejections_total", reason=reason) == 1
        assert cluster.metric("pdproxy_requests_total", endpoint="/tokenize", status="503") == 1
    finally:
        held.cancel()
        await session.close()
    await cluster.assert_no_leaks()
    assert cluster.flow.admitted == 0 and cluster.flow.admission.waiting == 0


async def test_model_lists_and_cancels_never_wait_for_a_slot(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    """GET /v1/models (clients list it on start) and a Responses cancel (it frees capacity) pass a full proxy."""
    cluster = await cluster_factory(n_prefill=1, max_concurrency=1, queue_size=0)
    session, held = await hold_the_only_slot(cluster)
    try:
        async with http.get(cluster.url + "/v1/models") as resp:
            assert resp.status == 200 and (await resp.json())["data"][0]["id"] == "mock"
        async with http.post(cluster.url + "/v1/responses/resp_unknown/cancel") as resp:
            assert resp.status == 404  # asked around the pool: the engine's own answer, not a 503
        assert cluster.metric("pdproxy_queue_rejections_total", reason="full") == 0
    finally:
        held.cancel()
        await session.close()
    await cluster.assert_no_leaks()


async def test_a_client_gone_while_queued_leaves_the_queue(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(n_prefill=1, max_concurrency=1)
    session, held = await hold_the_only_slot(cluster)
    waiter_session = aiohttp.ClientSession()
    waiting = asyncio.ensure_future(waiter_session.post(cluster.url + "/tokenize", json={"prompt": "a"}))
    await until_waiting(cluster, 1)
    waiting.cancel()
    await waiter_session.close()
    await until_waiting(cluster, 0)
    held.cancel()
    await session.close()
    await cluster.assert_no_leaks()
    assert cluster.metric("pdproxy_client_disconnects_total", stage="queue") == 1
    assert [r.path for r in cluster.decode[0].requests] == ["/v1/embeddings"]  # the queued one never went out
    assert cluster.flow.admitted == 0


# -- streamed routes ---------------------------------------------------------------------


def typed_events(raw: bytes) -> list[str]:
    return [line[len(b"event: "):].decode() for line in raw.split(b"\n") if line.startswith(b"event: ")]


async def test_messages_stream_is_relayed_event_by_event(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    body = {"model": "mock", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(cluster.url + "/v1/messages", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    assert typed_events(raw) == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                                 "content_block_stop", "message_delta", "message_stop"]
    texts = [orjson.loads(e)["delta"]["text"] for e in sse_events(raw) if b"text_delta" in e]
    assert texts == [" tok0", " tok1", " tok2"]
    await cluster.assert_no_leaks()


async def test_an_operator_s_cut_ends_a_pass_through_stream(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    engine = cluster.decode[0]
    engine.hold()  # the stream pauses after its first token
    body = {"model": "mock", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with http.post(cluster.url + "/v1/messages", json=body) as resp:
            first = await resp.content.readuntil(b"event: content_block_delta")
            assert b"message_start" in first
            assert cluster.flow.cut_streams(cluster.upstream(cluster.decode_urls[0]), "removed by the operator") == 1
            rest = await resp.read()
    finally:
        engine.release()
    assert orjson.loads(sse_events(rest)[-1])["error"]["message"] == "decode stream broke: removed by the operator"
    await cluster.assert_no_leaks()


async def test_responses_stream_then_get_by_id(cluster_factory: ClusterFactory,
                                               http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin")
    body = {"model": "mock", "input": "hi", "max_output_tokens": 2, "stream": True}
    for _ in range(2):  # one made on each engine
        async with http.post(cluster.url + "/v1/responses", json=body) as resp:
            assert resp.status == 200
            raw = await resp.read()
        kinds = typed_events(raw)
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        completed = orjson.loads(sse_events(raw)[-1])["response"]
        async with http.get(cluster.url + f"/v1/responses/{completed['id']}") as resp:
            assert resp.status == 200
            assert (await resp.json())["output"] == completed["output"]
    gets = [r for e in cluster.decode for r in e.requests if r.path.startswith("/v1/responses/")]
    assert len(gets) == 2  # the id was learned from the stream's first event: straight to its home
    await cluster.assert_no_leaks()


async def test_a_stream_cut_by_the_engine_ends_with_an_error_event(cluster: Cluster,
                                                                   http: aiohttp.ClientSession) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: message_start\ndata: {}\n\n")
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", cut)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        proxy = build_app(Settings(prefill_servers=cluster.prefill_urls[0], decode_servers=url, access_log=False))
        proxy_runner, proxy_url = await start_server(proxy, "127.0.0.1", 0)
        try:
            async with http.post(proxy_url + "/v1/messages", json={"max_tokens": 1, "stream": True}) as resp:
                raw = await resp.read()
            assert raw.startswith(b"event: message_start\ndata: {}\n\n")
            assert orjson.loads(sse_events(raw)[-1])["error"]["message"].startswith("decode stream broke")
            assert proxy.flow.in_flight == 0
        finally:
            await proxy_runner.cleanup()
    finally:
        await runner.cleanup()


# -- the Responses API by id ----------------------------------------------------------------


async def create(http: aiohttp.ClientSession, url: str, **extra: Any) -> dict[str, Any]:
    return await direct(http, url, "/v1/responses", {"model": "mock", "input": "hi", **extra})


async def test_get_and_cancel_by_id_reach_the_server_that_made_the_answer(cluster_factory: ClusterFactory,
                                                                          http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin")
    made = [await create(http, cluster.url) for _ in range(4)]
    for engine in cluster.decode:  # round robin: each engine made some; only it knows them
        assert engine.routes.state.responses
    for answer in made:
        async with http.get(cluster.url + f"/v1/responses/{answer['id']}") as resp:
            assert resp.status == 200
            assert (await resp.json())["id"] == answer["id"]
    gets = sum(1 for e in cluster.decode for r in e.requests if r.path.startswith("/v1/responses/"))
    assert gets == 4  # each went straight to its home: no asking around
    background = await create(http, cluster.url, background=True)
    async with http.post(cluster.url + f"/v1/responses/{background['id']}/cancel") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
    async with http.post(cluster.url + f"/v1/responses/{made[0]['id']}/cancel") as resp:
        assert resp.status == 400  # the engine's own answer: a synchronous response cannot be cancelled


async def test_an_id_this_process_never_saw_is_asked_around_the_pool(cluster_factory: ClusterFactory,
                                                                     http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=3, decode_policy="round_robin")
    made = [await create(http, cluster.url) for _ in range(3)]
    # A second proxy over the same engines (another worker, or this one restarted) knows no ids.
    other = build_app(Settings(prefill_servers=",".join(cluster.prefill_urls),
                               decode_servers=",".join(cluster.decode_urls), access_log=False),
                      rng=random.Random(1))
    runner, url = await start_server(other, "127.0.0.1", 0)
    try:
        for answer in made:
            async with http.get(url + f"/v1/responses/{answer['id']}") as resp:
                assert resp.status == 200
                assert (await resp.json())["id"] == answer["id"]
        async with http.get(url + "/v1/responses/resp_unknown") as resp:
            assert resp.status == 404
            assert "not found" in (await resp.json())["error"]["message"]
        assert other.flow.in_flight == 0
        asked = sum(1 for e in cluster.decode for r in e.requests if r.path.startswith("/v1/responses/"))
        before = asked
        async with http.get(url + f"/v1/responses/{made[-1]['id']}") as resp:  # found once: remembered
            assert resp.status == 200
        asked = sum(1 for e in cluster.decode for r in e.requests if r.path.startswith("/v1/responses/"))
        assert asked == before + 1
    finally:
        await runner.cleanup()


# -- vLLM's tokens-in API through PD -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_generate_runs_through_pd_with_the_kv_handoff(cluster: Cluster, http: aiohttp.ClientSession,
                                                            stream: bool) -> None:
    body: dict[str, Any] = {"token_ids": [11, 12, 13, 14], "sampling_params": {"max_tokens": 3, "min_tokens": 2},
                            "stream": stream}
    async with http.post(cluster.url + "/inference/v1/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
    if stream:
        chunks = [orjson.loads(e) for e in sse_events(raw) if e != b"[DONE]"]
        tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    else:
        tokens = orjson.loads(raw)["choices"][0]["token_ids"]
    assert tokens == [100, 101, 102]
    prefill = next(r for e in cluster.prefill for r in e.requests)
    assert prefill.path == "/inference/v1/generate"
    assert prefill.body["sampling_params"] == {"max_tokens": 1}
    assert prefill.body["kv_transfer_params"]["do_remote_decode"] is True and prefill.body["stream"] is False
    decode = cluster.decode[0]
    assert decode.stats.decodes_with_valid_handle == 1
    assert decode.requests[0].body["sampling_params"] == body["sampling_params"]
    await cluster.assert_no_leaks()


@pytest.mark.parametrize(("body", "param"), [
    ({"sampling_params": {}}, "token_ids"),
    ({"token_ids": ["a"], "sampling_params": {}}, "token_ids"),
    ({"token_ids": [1]}, "sampling_params"),
    ({"token_ids": [1], "sampling_params": {"n": 2}}, "sampling_params.n"),
])
async def test_generate_refuses_bodies_pd_cannot_serve(cluster: Cluster, http: aiohttp.ClientSession,
                                                       body: dict[str, Any], param: str) -> None:
    async with http.post(cluster.url + "/inference/v1/generate", json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == param
    assert not any(e.requests for e in [*cluster.prefill, *cluster.decode])


async def test_mock_config_can_be_given_for_pass_through_routes(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", model="other"))
    assert (await direct(http, cluster.url, "/v1/embeddings", {"input": "a"}))["model"] == "other"
