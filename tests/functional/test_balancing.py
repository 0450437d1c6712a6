"""Policies at work through the proxy: least_conn spreads a burst, prefix_hash keeps affinity."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

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
