"""Policies at work through the proxy: least_conn spreads a burst, prefix_hash and cache_aware keep
affinity; and the mock engine's prefix-cache model the routing benchmark relies on."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp

from pdproxy.mock import BLOCK_SIZE, MockConfig, start_mock
from tests.conftest import Cluster, ClusterFactory


async def hold(http: aiohttp.ClientSession, cluster: Cluster, prompt: str) -> asyncio.Task[None]:
    """Send a request whose prefill hangs; cancel the task to let it go."""

    async def send() -> None:
        async with http.post(cluster.url + "/v1/completions",
                             json={"model": "mock", "prompt": prompt, "max_tokens": 1}) as resp:
            await resp.read()

    return asyncio.create_task(send())


async def release(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_least_conn_spreads_concurrent_requests(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=3)
    for engine in cluster.prefill:
        engine.hang_next(times=10)
    tasks = [await hold(http, cluster, f"prompt {i}") for i in range(9)]
    for engine in cluster.prefill:
        await engine.wait_for_requests(3)  # 9 held requests over 3 servers: 3 each, no more
    assert [len(e.requests) for e in cluster.prefill] == [3, 3, 3]
    assert [u.in_flight for u in cluster.flow.prefill_pool.members] == [3, 3, 3]
    await release(tasks)


async def test_least_conn_respects_weights(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=2, prefill_weights=(2, 1))
    for engine in cluster.prefill:
        engine.hang_next(times=10)
    tasks = [await hold(http, cluster, f"prompt {i}") for i in range(6)]
    await cluster.prefill[0].wait_for_requests(4)
    await cluster.prefill[1].wait_for_requests(2)
    assert [len(e.requests) for e in cluster.prefill] == [4, 2]
    await release(tasks)


async def test_prefix_hash_keeps_a_prefix_on_one_server(cluster_factory: ClusterFactory,
                                                        http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=3, prefill_policy="prefix_hash", prefix_hash_chars=32)
    shared = "You are a helpful assistant. " * 2  # longer than the 32 hashed characters
    for i in range(6):
        async with http.post(cluster.url + "/v1/completions",
                             json={"model": "mock", "prompt": shared + f"question {i}", "max_tokens": 1}) as resp:
            assert resp.status == 200
    assert sorted(len(e.requests) for e in cluster.prefill) == [0, 0, 6]


async def test_prefix_hash_keeps_a_conversation_on_one_server(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    """Chat: the whole conversation is hashed, so turns of one conversation share a server."""
    cluster = await cluster_factory(n_prefill=3, prefill_policy="prefix_hash", prefix_hash_chars=64)
    system = {"role": "system", "content": "You are a helpful assistant."}
    servers = []
    for conversation in range(12):
        first_turn = {"role": "user", "content": f"conversation {conversation}: tell me about topic {conversation}"}
        chosen = set()
        for turn in range(3):
            messages = [system, first_turn] + [{"role": "user", "content": f"follow-up {turn}"}] * turn
            async with http.post(cluster.url + "/v1/chat/completions",
                                 json={"model": "mock", "messages": messages, "max_tokens": 1}) as resp:
                assert resp.status == 200
                request_id = resp.headers["X-Request-Id"]
            chosen |= {i for i, e in enumerate(cluster.prefill)
                       if any(r.header("X-Request-Id") == request_id for r in e.requests)}
        assert len(chosen) == 1, f"conversation {conversation} moved between servers"
        servers.append(chosen.pop())
    assert len(set(servers)) >= 2, "different conversations (same system prompt) all went to one server"


async def test_prefix_hash_spreads_different_prefixes(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=3, prefill_policy="prefix_hash")
    for i in range(30):
        async with http.post(cluster.url + "/v1/completions",
                             json={"model": "mock", "prompt": f"distinct prompt number {i}", "max_tokens": 1}) as r:
            assert r.status == 200
    counts = [len(e.requests) for e in cluster.prefill]
    assert all(count >= 3 for count in counts), counts


async def test_prefix_hash_moves_away_from_an_overloaded_server(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=2, prefill_policy="prefix_hash", prefix_hash_load_factor=0.25)
    for engine in cluster.prefill:
        engine.hang_next(times=5)
    prompt = "the same long shared prefix"
    tasks = [await hold(http, cluster, prompt)]
    home = await cluster.wait_any_prefill()
    tasks.append(await hold(http, cluster, prompt))
    await cluster.prefill[home].wait_for_requests(2)  # 2 in flight vs 0: within (1+0.25) x the mean share
    other = 1 - home
    assert len(cluster.prefill[other].requests) == 0
    tasks.append(await hold(http, cluster, prompt))  # a third would put it over the bound: it moves
    await cluster.prefill[other].wait_for_requests(1)
    assert len(cluster.prefill[home].requests) == 2
    await release(tasks)


async def test_round_robin_alternates(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=2, n_decode=2, prefill_policy="round_robin",
                                    decode_policy="round_robin")
    for _ in range(6):
        async with http.post(cluster.url + "/v1/completions",
                             json={"model": "mock", "prompt": "x", "max_tokens": 1}) as resp:
            assert resp.status == 200
    assert Counter(len(e.requests) for e in [*cluster.prefill, *cluster.decode]) == Counter({3: 4})


# ---------------------------------------------------------------- cache_aware


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def chat_turn(http: aiohttp.ClientSession, cluster: Cluster, messages: list[dict[str, Any]]) -> str:
    async with http.post(cluster.url + "/v1/chat/completions",
                         json={"model": "mock", "messages": messages, "max_tokens": 1}) as resp:
        assert resp.status == 200
        return resp.headers["X-Request-Id"]


def served_by(cluster: Cluster, request_id: str) -> int:
    (index,) = [i for i, e in enumerate(cluster.prefill) if any(r.header("X-Request-Id") == request_id
                                                                 for r in e.requests)]
    return index


async def test_cache_aware_keeps_conversations_on_their_server(cluster_factory: ClusterFactory,
                                                               http: aiohttp.ClientSession) -> None:
    """Concurrent multi-turn chats: each stays where its history is cached, and the engines' hits rise."""
    cluster = await cluster_factory(n_prefill=3, prefill_policy="cache_aware",
                                    prefill_config=MockConfig(role="prefill", prefill_ms_per_token=0.05))
    conversations = [[{"role": "system", "content": "You answer briefly. " + words(f"c{c}doc", 200)}]
                     for c in range(6)]
    homes: list[set[int]] = [set() for _ in conversations]
    hits_after_turn = []
    for turn in range(4):
        for c, messages in enumerate(conversations):
            messages.append({"role": "user", "content": words(f"c{c}t{turn}q", 30)})
        ids = await asyncio.gather(*(chat_turn(http, cluster, m) for m in conversations))
        for c, request_id in enumerate(ids):
            homes[c].add(served_by(cluster, request_id))
            conversations[c].append({"role": "assistant", "content": words(f"c{c}t{turn}a", 30)})
        hits_after_turn.append(sum(e.stats.prompt_tokens_hit for e in cluster.prefill))
    assert all(len(h) == 1 for h in homes), homes  # no conversation ever moved
    assert len(set().union(*homes)) >= 2  # concurrent new conversations spread by load
    assert hits_after_turn[0] == 0  # every first turn is new to every engine
    assert hits_after_turn[1] > 0 and hits_after_turn[3] > hits_after_turn[2] > hits_after_turn[1]
    hit = sum(e.stats.prompt_tokens_hit for e in cluster.prefill)
    miss = sum(e.stats.prompt_tokens_miss for e in cluster.prefill)
    first_turns = 6 * (3 + 200 + 2 + 30)  # roughly: every first turn was computed in full
    assert hit / (hit + miss - first_turns) > 0.7  # later turns: most of the history was cached


async def test_least_tokens_through_the_proxy(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    """A long prompt in flight weighs more than a short one: the next requests avoid its server."""
    cluster = await cluster_factory(n_prefill=2, prefill_policy="least_tokens")
    for engine in cluster.prefill:
        engine.hang_next(times=10)
    tasks = [await hold(http, cluster, words("long", 2000))]
    busy = await cluster.wait_any_prefill()
    for i in range(3):
        tasks.append(await hold(http, cluster, f"short prompt {i}"))
    await cluster.prefill[1 - busy].wait_for_requests(3)
    assert len(cluster.prefill[busy].requests) == 1
    await release(tasks)


# ---------------------------------------------------------------- the mock's prefix cache model


async def test_mock_prefix_cache_counts_hits_and_charges_only_uncached_tokens(http: aiohttp.ClientSession) -> None:
    engine, runner, url = await start_mock(MockConfig(role="prefill", prefill_ms_per_token=2.0, cache_blocks=64))
    kv = {"do_remote_decode": True, "do_remote_prefill": False}

    async def prefill(prompt: str) -> float:
        started = time.perf_counter()
        async with http.post(url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv}) as resp:
            assert resp.status == 200
        return time.perf_counter() - started

    try:
        prompt = words("w", 100)  # 100 tokens: 6 whole blocks of 16
        cold = await prefill(prompt)
        assert cold >= 0.2  # 100 uncached tokens x 2 ms
        warm = await prefill(prompt + " and more")
        assert warm < cold / 2  # 6 blocks cached: 102 - 96 = 6 tokens computed
        assert (engine.stats.prompt_tokens_hit, engine.stats.prompt_tokens_miss) == (6 * BLOCK_SIZE, 100 + 6)
        async with http.get(url + "/stats") as resp:
            stats = await resp.json()
        assert (stats["prompt_tokens_hit"], stats["prompt_tokens_miss"]) == (96, 106)
        # One prompt at a time: two cold prompts sent together finish one after the other.
        both = await asyncio.gather(prefill(words("a", 60)), prefill(words("b", 60)))
        assert max(both) >= 0.24  # 2 x 60 tokens x 2 ms
    finally:
        await runner.cleanup()


async def test_mock_prefix_cache_is_bounded_lru(http: aiohttp.ClientSession) -> None:
    engine, runner, url = await start_mock(MockConfig(role="both", cache_blocks=4))

    async def complete(prompt: str) -> None:
        async with http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as resp:
            assert resp.status == 200

    try:
        first, second = words("x", 64), words("y", 64)  # 4 blocks each: one fills the cache
        await complete(first)
        await complete(second)  # evicts the first
        await complete(first)
        assert engine.stats.prompt_tokens_hit == 0
        await complete(first)  # the whole prompt is cached; the last token is always computed
        assert engine.stats.prompt_tokens_hit == 63
        assert len(engine.prefix_cache) == 4
    finally:
        await runner.cleanup()
