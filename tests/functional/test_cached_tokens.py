"""usage.prompt_tokens_details.cached_tokens reports P's prefix-cache hit, not the KV D received by transfer."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import ClusterFactory, sse_events

PROMPT = " ".join(f"w{i}" for i in range(40))  # 2 whole blocks of 16 words, and 8 more
CACHED_ON_REPEAT = 32  # the 2 whole blocks


def usage_of(raw: bytes, stream: bool) -> dict[str, Any]:
    if not stream:
        return orjson.loads(raw)["usage"]  # type: ignore[no-any-return]
    return next(orjson.loads(e)["usage"] for e in sse_events(raw) if e != b"[DONE]" and b'"usage"' in e)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_cached_tokens_are_what_p_found(cluster_factory: ClusterFactory, http: aiohttp.ClientSession,
                                              stream: bool, endpoint: str) -> None:
    cluster = await cluster_factory(n_prefill=1)
    body: dict[str, Any] = {"model": "mock", "max_tokens": 2, "stream": stream}
    if endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    if stream:
        body["stream_options"] = {"include_usage": True}
    seen = []
    for _ in range(2):
        async with http.post(cluster.url + endpoint, json=body) as resp:
            assert resp.status == 200
            seen.append(usage_of(await resp.read(), stream))
    prompt_tokens = seen[0]["prompt_tokens"]
    # D got the whole prompt by transfer each time, and says so; the client hears what P had cached.
    assert cluster.decode[0].stats.decodes_with_valid_handle == 2
    assert seen[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert seen[1]["prompt_tokens_details"] == {"cached_tokens": CACHED_ON_REPEAT} and prompt_tokens > 32
    assert cluster.metric("pdproxy_prefill_cached_prompt_tokens_total") == CACHED_ON_REPEAT
    await cluster.assert_no_leaks()


async def test_generate_reports_p_s_cache_too(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1)
    body = {"token_ids": list(range(40)), "sampling_params": {"max_tokens": 1}, "stream": True,
            "stream_options": {"include_usage": True}}
    for expected in (0, CACHED_ON_REPEAT):
        async with http.post(cluster.url + "/inference/v1/generate", json=body) as resp:
            assert usage_of(await resp.read(), True)["prompt_tokens_details"] == {"cached_tokens": expected}


async def test_a_stream_without_usage_is_relayed_untouched(cluster_factory: ClusterFactory,
                                                           http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1)
    body = {"model": "mock", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    for _ in range(2):
        async with http.post(cluster.url + "/v1/completions", json=body) as resp:
            raw = await resp.read()
    assert b"cached_tokens" not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert len(sse_events(raw)) == 4
    assert cluster.metric("pdproxy_prefill_cached_prompt_tokens_total") == CACHED_ON_REPEAT


async def test_a_d_that_recomputed_keeps_its_own_count(cluster_factory: ClusterFactory, serve_app: Any,
                                                       http: aiohttp.ClientSession) -> None:
    """No handle (P answered without kv_transfer_params): D's count is its own prefix cache, left as it is."""

    async def prefill(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"text": "x"}], "usage": {
            "prompt_tokens": 40, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 5}}})

    app = web.Application()
    app.router.add_post("/v1/completions", prefill)
    cluster = await cluster_factory(n_prefill=0, extra_prefill=(await serve_app(app),))
    body = {"model": "mock", "prompt": PROMPT, "max_tokens": 1}
    for _ in range(2):
        async with http.post(cluster.url + "/v1/completions", json=body) as resp:
            usage = (await resp.json())["usage"]
    assert cluster.decode[0].stats.decodes_without_handle == 2
    assert usage["prompt_tokens_details"] == {"cached_tokens": CACHED_ON_REPEAT}  # D's own cache, true
    assert cluster.metric("pdproxy_prefill_cached_prompt_tokens_total") == 10
