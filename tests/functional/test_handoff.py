"""The vLLM KV handoff on the wire: prefill rewrites, handle passthrough, request ids, auth."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tests.conftest import Cluster, ClusterFactory, sse_events

KV_REQUEST_BLOCK = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_requests(cluster: Cluster) -> list[Any]:
    return [r for engine in cluster.prefill for r in engine.requests]


async def test_prefill_body_has_every_rewrite(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 20,
        "max_completion_tokens": 12,
        "min_tokens": 3,
        "min_completion_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "kv_transfer_params": {"forged": True},
    }
    async with http.post(cluster.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    [prefill] = prefill_requests(cluster)
    assert prefill.path == "/v1/chat/completions"
    assert prefill.body == {
        "model": "mock",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "stream": False,
        "temperature": 0.5,
        "kv_transfer_params": KV_REQUEST_BLOCK,
    }
    [decode] = cluster.decode[0].requests
    # The decode body is the client's own, with only the handle replaced.
    expected = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    assert {k: v for k, v in decode.body.items() if k != "kv_transfer_params"} == expected
    assert decode.body["kv_transfer_params"]["do_remote_prefill"] is True
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


async def test_max_completion_tokens_is_only_added_when_the_client_sent_it(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    body = {"model": "mock", "prompt": "hi", "max_tokens": 5}
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
    [prefill] = prefill_requests(cluster)
    assert "max_completion_tokens" not in prefill.body
    assert prefill.body["max_tokens"] == 1


async def test_handle_reaches_decode_unchanged(
    cluster_factory: ClusterFactory, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    """Whatever P returns as kv_transfer_params, D gets it byte-identical: nothing is rewritten."""
    handle = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [[1, 2, 3], [7]],
        "remote_engine_id": "engine-p0",
        "remote_request_id": "req-xyz",
        "remote_host": "nixl-side-channel.internal",  # not the HTTP address: must not be rewritten
        "remote_port": 5601,
        "tp_size": 2,
        "remote_blocks_expiry_time": 1767225600.125,
        "future_key": {"nested": [None, True, "x"]},
    }

    async def prefill(request: web.Request) -> web.Response:
        return web.json_response({"id": "cmpl-1", "choices": [{"text": "x"}], "kv_transfer_params": handle})

    app = web.Application()
    app.router.add_post("/v1/completions", prefill)
    cluster = await cluster_factory(n_prefill=0, extra_prefill=(await serve_app(app),))
    async with aiohttp.ClientSession() as http, http.post(
        cluster.url + "/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 2}
    ) as resp:
        assert resp.status == 200
    [decode] = cluster.decode[0].requests
    assert decode.body["kv_transfer_params"] == handle
    assert cluster.metric("pdproxy_kv_handoff_missing_total") == 0


async def test_missing_handle_still_decodes_and_is_counted(
    cluster_factory: ClusterFactory, serve_app: Callable[[web.Application], Awaitable[str]]
) -> None:
    async def prefill(request: web.Request) -> web.Response:
        return web.json_response({"id": "cmpl-1", "choices": [{"text": "x"}], "kv_transfer_params": None})

    app = web.Application()
    app.router.add_post("/v1/completions", prefill)
    cluster = await cluster_factory(n_prefill=0, extra_prefill=(await serve_app(app),))
    async with aiohttp.ClientSession() as http, http.post(
        cluster.url + "/v1/completions",
        json={"model": "mock", "prompt": "hi", "max_tokens": 3, "kv_transfer_params": {"forged": 1}},
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["text"] == " tok0 tok1 tok2"
    [decode] = cluster.decode[0].requests
    assert "kv_transfer_params" not in decode.body  # the client's forged handle never reaches D
    assert cluster.decode[0].stats.decodes_without_handle == 1
    assert cluster.metric("pdproxy_kv_handoff_missing_total") == 1


async def test_client_request_id_is_used_on_both_legs_and_returned(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    body = {"model": "mock", "prompt": "hi", "max_tokens": 2, "stream": True}
    async with http.post(cluster.url + "/v1/completions", json=body, headers={"X-Request-Id": "client-42"}) as resp:
        assert resp.headers["X-Request-Id"] == "client-42"
        events = sse_events(await resp.read())
    assert orjson.loads(events[0])["id"] == "cmpl-client-42"
    [prefill] = prefill_requests(cluster)
    [decode] = cluster.decode[0].requests
    assert prefill.header("X-Request-Id") == decode.header("X-Request-Id") == "client-42"


async def test_fresh_unique_request_id_when_the_client_sends_none(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    ids = []
    for _ in range(2):
        async with http.post(cluster.url + "/v1/completions",
                             json={"model": "mock", "prompt": "hi", "max_tokens": 2}) as resp:
            assert resp.status == 200
            ids.append(resp.headers["X-Request-Id"])
    assert ids[0] != ids[1] and all(len(i) >= 16 for i in ids)
    prefill_ids = [r.header("X-Request-Id") for r in prefill_requests(cluster)]
    decode_ids = [r.header("X-Request-Id") for r in cluster.decode[0].requests]
    assert sorted(prefill_ids) == sorted(decode_ids) == sorted(ids)


async def test_client_authorization_is_forwarded(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 1},
                         headers={"Authorization": "Bearer client-key"}) as resp:
        assert resp.status == 200
    [prefill] = prefill_requests(cluster)
    assert prefill.header("Authorization") == "Bearer client-key"
    assert cluster.decode[0].requests[0].header("Authorization") == "Bearer client-key"


async def test_upstream_api_key_replaces_the_client_authorization(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(upstream_api_key="server-key")
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 1},
                         headers={"Authorization": "Bearer client-key"}) as resp:
        assert resp.status == 200
    assert prefill_requests(cluster)[0].header("Authorization") == "Bearer server-key"
    assert cluster.decode[0].requests[0].header("Authorization") == "Bearer server-key"


# Deliberately non-canonical: odd spacing, an SSE comment, a multi-byte character split across writes.
ODD_STREAM = [b'data: {"a" :  1}\n\n', b": keep-alive comment\n\n", b'data: {"t": "caf\xc3', b'\xa9"}\n\n',
              b"data: [DONE]\n\n"]
ODD_JSON = b'{ "id" : "x",\n  "choices": [] }'


def odd_decode_app() -> web.Application:
    async def decode(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=ODD_JSON, content_type="application/json", charset="latin-1")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for piece in ODD_STREAM:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", decode)
    return app


async def test_decode_bytes_are_relayed_unchanged(
    cluster_factory: ClusterFactory, serve_app: Callable[[web.Application], Awaitable[str]],
    http: aiohttp.ClientSession,
) -> None:
    cluster = await cluster_factory(n_decode=0, extra_decode=(await serve_app(odd_decode_app()),))
    body = {"model": "mock", "prompt": "hi", "max_tokens": 4}
    async with http.post(cluster.url + "/v1/completions", json=body | {"stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert await resp.read() == b"".join(ODD_STREAM)
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json; charset=latin-1"
        assert await resp.read() == ODD_JSON


async def test_upstream_cookies_never_reach_other_requests(
    cluster_factory: ClusterFactory, serve_app: Callable[[web.Application], Awaitable[str]],
    http: aiohttp.ClientSession,
) -> None:
    seen: list[str | None] = []

    async def prefill(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": None})
        response.set_cookie("session", "client-a-secret")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", prefill)
    # A host name, as in real deployments: aiohttp's default jar would ignore cookies from a bare IP.
    url = (await serve_app(app)).replace("127.0.0.1", "localhost")
    cluster = await cluster_factory(n_prefill=0, extra_prefill=(url,))
    for _ in range(2):
        async with http.post(cluster.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}) as resp:
            assert resp.status == 200
    assert seen == [None, None]
