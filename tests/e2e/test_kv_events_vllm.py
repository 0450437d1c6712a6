"""Real vLLM's KV-cache events (--kv-events-config on both prefill servers): pdproxy's token blocks for a
completion and a chat are the ones the engine stored, and a repeated prefix goes to the server holding it.

Named to sort before test_vllm.py: its failover tests kill prefill servers, the last one for good."""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.request import ProxyRequest
from pdproxy.routing.kv_events import EXACT
from pdproxy.routing.kv_view import KvEventsView
from pdproxy.routing.prompt_tokens import HfPromptTokens
from pdproxy.upstreams import Role, Upstream, UpstreamPool
from tests.e2e.conftest import CLUSTER_ENV, Cluster, scrape

pytestmark = pytest.mark.vllm


def _raw() -> dict[str, Any]:
    return json.loads(Path(os.environ[CLUSTER_ENV]).read_text())


@pytest.fixture
async def view(vllm_cluster: Cluster) -> AsyncIterator[tuple[KvEventsView, list[Upstream]]]:
    """pdproxy's KV-event views of both prefill servers, subscribed the way the proxy does it."""
    tokens = HfPromptTokens.from_files(str(Path(_raw()["model_dir"]) / "tokenizer.json"))
    kv = KvEventsView(tokens)
    pool = UpstreamPool(Role.PREFILL, [Upstream(Role.PREFILL, p.url) for p in vllm_cluster.prefill])
    async with aiohttp.ClientSession() as http:
        task = asyncio.ensure_future(kv.run(pool, http))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not all(u.url in kv.caches and kv.caches[u.url].state == EXACT for u in pool.members):
                assert loop.time() < deadline, {u: c.describe() for u, c in kv.caches.items()}
                await asyncio.sleep(0.1)
            yield kv, list(pool.members)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _document() -> str:
    rng = random.Random(uuid.uuid4().int)
    words = ["alpha", "state", "limit", "return", "value", "kernel", "block", "cache", "token", "prefix"]
    return f"# {uuid.uuid4().hex}\n" + " ".join(rng.choice(words) for _ in range(420))


async def _post(url: str, path: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http, http.post(url + path, json=body,
                                                          timeout=aiohttp.ClientTimeout(total=120)) as resp:
        assert resp.status == 200, await resp.text()


async def _held(kv: KvEventsView, upstream: Upstream, body: dict[str, Any], want: int) -> int:
    """Prompt tokens the server holds for `body` by its events, once they reach `want` (or 15 s pass)."""
    blocks = kv.blocks(body)
    assert blocks is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        held = kv.matched_tokens(upstream, blocks) or 0
        if held >= want or loop.time() > deadline:
            return held
        await asyncio.sleep(0.1)  # the engine publishes from its own thread: nothing here to wait on


async def _engine_block_size(kv: KvEventsView, upstream: Upstream) -> int:
    """The block size the engine's own events state (15 s at most): until the first BlockStored arrives the view
    only has a default, and the expected count must use the engine's size, not that guess."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while (size := kv.caches[upstream.url].block_size) is None:
        assert loop.time() < deadline, kv.caches[upstream.url].describe()
        await asyncio.sleep(0.1)  # the engine publishes from its own thread: nothing here to wait on
    return size


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_pdproxys_blocks_are_the_ones_the_engine_stored(
        vllm_cluster: Cluster, view: tuple[KvEventsView, list[Upstream]], kind: str) -> None:
    kv, upstreams = view
    target = upstreams[0]
    document = _document()
    if kind == "chat":
        body: dict[str, Any] = {"model": vllm_cluster.model, "max_tokens": 1,
                                "messages": [{"role": "system", "content": "You answer briefly."},
                                             {"role": "user", "content": document}]}
        path = "/v1/chat/completions"
    else:
        body, path = {"model": vllm_cluster.model, "max_tokens": 1, "prompt": document}, "/v1/completions"
    blocks = kv.blocks(body)
    assert blocks is not None and len(blocks.tokens) > 300
    assert kv.matched_tokens(target, blocks) == 0  # a fresh document: no engine holds it
    await _post(target.url, path, body)
    size = await _engine_block_size(kv, target)
    whole = len(blocks.tokens) // size * size
    assert whole >= size
    # Every whole block of the prompt pdproxy tokenized is a block the engine said it stored, in order:
    # same tokens per block (the keys chain them), so the same prefix the engine hashed.
    assert await _held(kv, target, body, whole) == whole, kv.caches[target.url].describe()
    assert kv.matched_tokens(upstreams[1], blocks) == 0
    print(f"{kind}: {len(blocks.tokens)} prompt tokens, {whole // size} blocks of {size} matched the engine's")


async def test_a_repeated_prefix_goes_to_the_server_that_holds_it(
        vllm_cluster: Cluster, view: tuple[KvEventsView, list[Upstream]]) -> None:
    kv, upstreams = view
    document = _document()
    holder = upstreams[1]
    await _post(holder.url, "/v1/completions", {"model": vllm_cluster.model, "max_tokens": 1, "prompt": document})
    assert await _held(kv, holder, {"prompt": document}, 256) >= 256
    options = PolicyOptions(prefix_chars=1024, vnodes=160, load_factor=0.25, block_chars=128, index_max_blocks=1000,
                            cache_weight=2.0, cache_load="tokens", chars_per_token=4.0)
    policy = make_balancer("cache_aware", options, rng=random.Random(1))
    policy.use_kv_events(kv)  # type: ignore[attr-defined]
    request = ProxyRequest("/v1/completions", {"prompt": document + " and then"}, False, "e2e", {})
    assert policy.choose(upstreams, request) is holder

    # And through a running pdproxy (cache_aware, --kv-events): the repeats land on the holder.
    proxy = _raw()["proxy_kv_events"]
    async with aiohttp.ClientSession() as http:
        before = {p.name: await scrape(http, p.url) for p in vllm_cluster.prefill}
    for i in range(3):
        await _post(proxy, "/v1/completions", {"model": vllm_cluster.model, "max_tokens": 2,
                                               "prompt": document + f" question {i}"})
    async with aiohttp.ClientSession() as http:
        after = {p.name: await scrape(http, p.url) for p in vllm_cluster.prefill}
    served = {p.name: after[p.name].get("vllm:request_success_total") - before[p.name].get("vllm:request_success_total")
              for p in vllm_cluster.prefill}
    holder_name = next(p.name for p in vllm_cluster.prefill if p.url == holder.url)
    assert served[holder_name] == 3, served
