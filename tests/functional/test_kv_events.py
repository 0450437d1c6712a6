"""KV-event routing against the mock engine's real ZMQ publisher: catch-up, gaps and replays, no replay
socket, garbage, an engine restarted in place, and cache_aware sending a prefix where the events say it is."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pdproxy.mock import BLOCK_SIZE, MockConfig, MockEngine, start_mock
from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.request import ProxyRequest
from pdproxy.routing.kv_events import EXACT, FALLBACK, ServerCache
from pdproxy.routing.kv_view import KvEventsView
from pdproxy.routing.prompt_tokens import WordPromptTokens
from pdproxy.upstreams import Lease, Role, Upstream, UpstreamPool

DOCUMENT = " ".join(f"w{i}" for i in range(3 * BLOCK_SIZE + 5))  # 3 whole blocks


async def until(check: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Wait for a condition the subscriber's task makes true (it runs on this loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Harness:
    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.garbage: list[str] = []
        self.states: list[tuple[str, str]] = []
        self.view = KvEventsView(WordPromptTokens(), on_state=lambda c, old, why: self.states.append((c.name, c.state)),
                                 on_garbage=self.garbage.append)
        self.pool = UpstreamPool(Role.PREFILL)
        self.task: asyncio.Task[None] | None = None
        self.http = aiohttp.ClientSession()

    async def engine(self, **config: Any) -> tuple[MockEngine, Upstream]:
        engine, runner, url = await start_mock(MockConfig(role="prefill", kv_events=True, **config))
        self.runners.append(runner)
        upstream = self.pool.find(url)
        if upstream is None:
            upstream = Upstream(Role.PREFILL, url)
            self.pool.add(upstream)
        return engine, upstream

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.view.run(self.pool, self.http))

    def cache(self, upstream: Upstream) -> ServerCache:
        return self.view.caches[upstream.url]

    async def exact(self, upstream: Upstream) -> ServerCache:
        await until(lambda: upstream.url in self.view.caches and self.cache(upstream).state == EXACT, "exact")
        return self.cache(upstream)

    async def prompt(self, upstream: Upstream, text: str) -> None:
        async with self.http.post(upstream.url + "/v1/completions",
                                  json={"model": "mock", "prompt": text, "max_tokens": 1}) as resp:
            assert resp.status == 200

    def held(self, upstream: Upstream, text: str) -> int | None:
        blocks = self.view.blocks({"prompt": text})
        assert blocks is not None
        return self.view.matched_tokens(upstream, blocks)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for runner in self.runners:
            await runner.cleanup()
        await self.http.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


async def test_events_flow_into_an_exact_view(harness: Harness) -> None:
    engine, upstream = await harness.engine()
    await harness.prompt(upstream, DOCUMENT)  # before anyone subscribed: the replay brings it
    harness.start()
    cache = await harness.exact(upstream)
    assert harness.held(upstream, DOCUMENT + " more words") == 3 * BLOCK_SIZE
    await harness.prompt(upstream, "other " * 40)
    await until(lambda: cache.next_seq == engine.kv_events.next_seq, "the live batch")  # type: ignore[union-attr]
    assert harness.held(upstream, "other " * 40) == 2 * BLOCK_SIZE
    assert harness.held(upstream, "unrelated " * 40) == 0


async def test_a_gap_is_replayed_back_to_exact(harness: Harness) -> None:
    engine, upstream = await harness.engine()
    harness.start()
    cache = await harness.exact(upstream)
    publisher = engine.kv_events
    assert publisher is not None
    publisher.drop_next()
    await harness.prompt(upstream, DOCUMENT)  # lost on the PUB socket
    await harness.prompt(upstream, "second " * 20)  # arrives: the gap shows, a replay fills it
    await until(lambda: cache.next_seq == publisher.next_seq and cache.state == EXACT, "the replay")
    assert (name := upstream.url, "degraded") in harness.states and (name, EXACT) == harness.states[-1]
    assert harness.held(upstream, DOCUMENT) == 3 * BLOCK_SIZE


async def test_no_replay_socket_means_fallback(harness: Harness) -> None:
    _, upstream = await harness.engine(kv_events_replay=False)
    harness.start()
    await until(lambda: upstream.url in harness.view.caches and harness.cache(upstream).reason == "replay unavailable",
                "the failed catch-up")
    assert harness.cache(upstream).state == FALLBACK and harness.held(upstream, DOCUMENT) is None
    await harness.prompt(upstream, DOCUMENT)
    assert harness.cache(upstream).state == FALLBACK  # a view without its history is never used


async def test_garbage_is_ignored_and_counted(harness: Harness) -> None:
    engine, upstream = await harness.engine()
    harness.start()
    cache = await harness.exact(upstream)
    publisher = engine.kv_events
    assert publisher is not None
    publisher.send_raw(b"kv", b"\x00" * 8, b"not msgpack \xc1")
    publisher.send_raw(b"kv", b"short")
    publisher.send_raw(b"only one frame")
    await until(lambda: len(harness.garbage) == 3, "three garbage messages")
    await harness.prompt(upstream, DOCUMENT)
    await until(lambda: cache.next_seq == publisher.next_seq, "the next good batch")
    assert cache.state == EXACT and harness.held(upstream, DOCUMENT) == 3 * BLOCK_SIZE


async def test_an_engine_restarted_in_place_starts_the_view_again(harness: Harness) -> None:
    engine, upstream = await harness.engine()
    harness.start()
    cache = await harness.exact(upstream)
    await harness.prompt(upstream, DOCUMENT)
    await until(lambda: harness.held(upstream, DOCUMENT) == 3 * BLOCK_SIZE, "the first engine's blocks")
    publisher = engine.kv_events
    assert publisher is not None and publisher.replay_port is not None
    ports = publisher.port, publisher.replay_port
    await harness.runners.pop().cleanup()  # the engine goes away, its cache with it
    await until(lambda: cache.state != EXACT, "the lost connection")
    assert harness.held(upstream, DOCUMENT) is None  # not exact: never routed on what the old engine held
    await start_again(harness, *ports)
    await until(lambda: cache.state == EXACT, "catching up with the new engine")
    assert harness.held(upstream, DOCUMENT) == 0


async def start_again(harness: Harness, kv_port: int, replay_port: int) -> None:
    """A new engine on the same event ports, as a restarted vLLM with the same --kv-events-config.

    (Its HTTP side does not matter to the subscriber.)"""
    _, runner, _ = await start_mock(MockConfig(role="prefill", kv_events=True, kv_events_port=kv_port,
                                               kv_events_replay_port=replay_port))
    harness.runners.append(runner)


async def test_cache_aware_sends_a_prefix_where_the_events_say_it_is(harness: Harness) -> None:
    _, first = await harness.engine()
    _, second = await harness.engine()
    harness.start()
    await harness.exact(first)
    await harness.exact(second)
    await harness.prompt(second, DOCUMENT)  # only the second engine holds the document
    await until(lambda: harness.held(second, DOCUMENT) == 3 * BLOCK_SIZE, "the second engine's blocks")
    options = PolicyOptions(prefix_chars=256, vnodes=40, load_factor=0.25, block_chars=64, index_max_blocks=1000,
                            cache_weight=2.0, cache_load="tokens", chars_per_token=4.0, tokenizer="words")
    policy = make_balancer("cache_aware", options, rng=random.Random(1))
    policy.use_kv_events(harness.view)  # type: ignore[attr-defined]
    for i in range(5):  # the approximate index alone has never seen this prefix: a tie it would break at random
        request = ProxyRequest("/v1/completions", {"prompt": f"{DOCUMENT} question {i}"}, False, str(i), {})
        assert policy.choose([first, second], request) is second


async def test_the_proxy_shows_each_servers_state_in_health_metrics_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pdproxy.app import build_app, start_server
    from pdproxy.settings import Settings

    engine, prefill_runner, prefill_url = await start_mock(MockConfig(role="prefill", kv_events=True))
    _, decode_runner, decode_url = await start_mock(MockConfig(role="decode"))
    settings = Settings(prefill_servers=prefill_url, decode_servers=decode_url, access_log=False, health_interval=0,
                        prefill_policy="cache_aware", kv_events=True, tokenizer="words")
    proxy_runner, proxy_url = await start_server(build_app(settings), "127.0.0.1", 0)
    caplog.set_level("INFO", "pdproxy.kv_events")
    try:
        async with aiohttp.ClientSession() as http:
            async def kv_state() -> dict[str, Any]:
                async with http.get(proxy_url + "/health?verbose=1") as resp:
                    upstreams = (await resp.json())["upstreams"]
                    return next(u for u in upstreams if u["url"] == prefill_url)["kv_events"]

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3
            while (state := await kv_state())["state"] != EXACT:
                assert loop.time() < deadline, state
                await asyncio.sleep(0.02)
            async with http.post(proxy_url + "/v1/completions",
                                 json={"model": "mock", "prompt": DOCUMENT, "max_tokens": 1}) as resp:
                assert resp.status == 200
            async with http.get(proxy_url + "/metrics") as resp:
                exposition = await resp.text()
        assert f'pdproxy_kv_events_state{{state="exact",upstream="{prefill_url}"}} 1.0' in exposition
        assert f'pdproxy_kv_events_state{{state="fallback",upstream="{prefill_url}"}} 0.0' in exposition
        assert any(f"kv events of {prefill_url}: fallback -> exact" in r.getMessage() for r in caplog.records)
        assert engine.stats.prefills == 1
    finally:
        for runner in (proxy_runner, prefill_runner, decode_runner):
            await runner.cleanup()


async def test_its_own_decisions_count_until_the_events_confirm_them(harness: Harness) -> None:
    _, first = await harness.engine()
    _, second = await harness.engine()
    harness.start()
    await harness.exact(first)
    await harness.exact(second)
    options = PolicyOptions(prefix_chars=256, vnodes=40, load_factor=0.25, block_chars=64, index_max_blocks=1000,
                            cache_weight=2.0, cache_load="requests", chars_per_token=4.0, tokenizer="words")
    now = [100.0]
    policy = make_balancer("cache_aware", options, rng=random.Random(3), clock=lambda: now[0])
    policy.use_kv_events(harness.view)  # type: ignore[attr-defined]

    def choose(i: int) -> Upstream:
        return policy.choose([first, second], ProxyRequest("/v1/completions", {"prompt": f"{DOCUMENT} q{i}"},
                                                           False, str(i), {}))

    home = choose(0)  # sent nowhere yet: no engine has said it holds the document
    lease = Lease(home)  # one more request in flight there than on the other
    assert all(choose(i) is home for i in range(1, 4))  # a burst stays together all the same
    now[0] += 2.5  # the events never confirmed it (nothing was sent): it no longer counts
    assert choose(4) is not home  # only the load differs now
    lease.release()


async def test_a_removal_the_events_report_after_a_send_voids_it(harness: Harness) -> None:
    _, first = await harness.engine(cache_blocks=3)  # the document fills each engine's cache
    _, second = await harness.engine(cache_blocks=3)
    harness.start()
    await harness.exact(first)
    await harness.exact(second)
    options = PolicyOptions(prefix_chars=256, vnodes=40, load_factor=0.25, block_chars=64, index_max_blocks=1000,
                            cache_weight=2.0, cache_load="requests", chars_per_token=4.0, tokenizer="words")
    policy = make_balancer("cache_aware", options, rng=random.Random(3), clock=lambda: 100.0)  # time stands still
    policy.use_kv_events(harness.view)  # type: ignore[attr-defined]

    def choose(i: int) -> Upstream:
        return policy.choose([first, second], ProxyRequest("/v1/completions", {"prompt": f"{DOCUMENT} q{i}"},
                                                           False, str(i), {}))

    home = choose(0)
    other = second if home is first else first
    lease = Lease(home)
    assert choose(1) is home  # its own send counts as held, one request in flight or not
    await harness.prompt(home, DOCUMENT)  # the engine stores the document ...
    await until(lambda: harness.held(home, DOCUMENT) == 3 * BLOCK_SIZE, "the stored document")
    await harness.prompt(home, "other " * (3 * BLOCK_SIZE))  # ... and evicts it for another prompt
    await until(lambda: harness.held(home, DOCUMENT) == 0, "the document's removal")
    assert choose(2) is other  # the removal is newer than the sends: only the load differs now
    lease.release()
