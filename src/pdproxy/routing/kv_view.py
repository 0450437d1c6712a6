"""Every prefill server's exact cache view, kept current by one subscriber each, for cache_aware.

`KvEventsView.run(pool)` follows the pool's membership (a server added at runtime is subscribed
to, a removed one dropped) and discovers each engine's publisher unless it is configured. The
policy asks `matched_tokens(upstream, body)`: None unless that server's view is exact, so the
approximate index decides for servers in `degraded` or `fallback`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import zmq.asyncio

from pdproxy.routing.kv_events import FALLBACK, ServerCache, block_keys_of_tokens
from pdproxy.routing.kv_subscriber import RETRY_INTERVAL, EventSource, KvSubscriber, discover
from pdproxy.routing.prompt_tokens import PromptTokens
from pdproxy.upstreams import Upstream, UpstreamPool

log = logging.getLogger("pdproxy.kv_events")

DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size
SYNC_INTERVAL = 1.0  # seconds between looks at the pool's membership (and retries of discovery)


class RequestBlocks:
    """One request's token ids, and their block keys per block size, computed once per decision."""

    __slots__ = ("_by_size", "tokens")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self._by_size: dict[int, list[int]] = {}

    def keys(self, block_size: int) -> list[int]:
        keys = self._by_size.get(block_size)
        if keys is None:
            keys = self._by_size[block_size] = block_keys_of_tokens(self.tokens, block_size)
        return keys


class KvEventsView:
    """The exact views of the prefill servers, and their subscriptions."""

    def __init__(self, prompt_tokens: PromptTokens, *, sources: Mapping[str, EventSource] | None = None,
                 discover_sources: bool = True,
                 on_state: Callable[[ServerCache, str, str], None] = lambda cache, old, why: None,
                 on_garbage: Callable[[str], None] = lambda url: None) -> None:
        self.prompt_tokens = prompt_tokens
        self._sources = dict(sources or {})
        self._discover = discover_sources
        self._on_state = on_state
        self._on_garbage = on_garbage
        self.caches: dict[str, ServerCache] = {}
        self._subscribers: dict[str, KvSubscriber] = {}
        self._context: zmq.asyncio.Context | None = None

    # -- the policy's side -----------------------------------------------------------------------

    def blocks(self, body: dict[str, Any]) -> RequestBlocks | None:
        tokens = self.prompt_tokens.ids(body)
        return RequestBlocks(tokens) if tokens else None

    def block_size(self, upstream: Upstream) -> int:
        """The server's block size, once an event said it; until then another server's, or vLLM's default."""
        cache = self.caches.get(upstream.url)
        if cache is not None and cache.block_size is not None:
            return cache.block_size
        return next((c.block_size for c in self.caches.values() if c.block_size is not None), DEFAULT_BLOCK_SIZE)

    def exact(self, upstream: Upstream) -> bool:
        cache = self.caches.get(upstream.url)
        return cache is not None and cache.usable

    def matched_tokens(self, upstream: Upstream, blocks: RequestBlocks) -> int | None:
        """Prompt tokens the server holds for this request, or None when its view is not exact."""
        cache = self.caches.get(upstream.url)
        if cache is None or not cache.usable:
            return None
        if cache.block_size is None:  # exact, and no block stored yet: it holds nothing
            return 0
        size = cache.block_size
        return cache.matched(blocks.keys(size)) * size

    def mark(self, upstream: Upstream) -> int:
        """Where the server's events are now: give it back to `forgot_since` (0 before any view)."""
        cache = self.caches.get(upstream.url)
        return cache.applied if cache is not None else 0

    def forgot_since(self, upstream: Upstream, key: int, mark: int) -> bool:
        """Whether the server's events removed `key` (or the view started again) since `mark`."""
        cache = self.caches.get(upstream.url)
        return cache is None or cache.forgot_since(key, mark)

    def describe(self, upstream: Upstream) -> dict[str, object]:
        cache = self.caches.get(upstream.url)
        return cache.describe() if cache is not None else {"state": FALLBACK, "reason": "not subscribed"}

    # -- subscriptions ---------------------------------------------------------------------------

    async def run(self, pool: UpstreamPool, session: aiohttp.ClientSession) -> None:
        """Follow `pool` until cancelled; every subscription ends with it."""
        self._context = zmq.asyncio.Context()
        try:
            while True:
                await self.sync(pool, session)
                await asyncio.sleep(SYNC_INTERVAL)
        finally:
            for subscriber in self._subscribers.values():
                await subscriber.stop()
            self._subscribers.clear()
            self._context.term()

    async def sync(self, pool: UpstreamPool, session: aiohttp.ClientSession) -> None:
        assert self._context is not None
        urls = {u.url for u in pool.members}
        for upstream in pool.members:  # /health?verbose=1 shows each one's view
            if upstream.kv_events is None:
                upstream.kv_events = lambda upstream=upstream: self.describe(upstream)  # type: ignore[misc]
        for url in [u for u in self._subscribers if u not in urls]:
            await self._subscribers.pop(url).stop()
            self.caches.pop(url, None)
            log.info("kv events: %s left the pool: unsubscribed", url)
        for url in sorted(urls - set(self._subscribers)):
            source = self._sources.get(url)
            if source is None and self._discover:
                source = await discover(session, url)
            cache = self.caches.get(url)
            if cache is None:
                cache = self.caches[url] = ServerCache(url, on_state=self._on_state)
                self._on_state(cache, "", cache.reason)
            if source is None:
                cache.reason = "the engine publishes no KV events (GET /kv_event_sources)"
                continue  # tried again at the next sync
            subscriber = KvSubscriber(cache, source, self._context, on_garbage=lambda url=url: self._on_garbage(url),
                                      retry_interval=RETRY_INTERVAL)
            self._subscribers[url] = subscriber
            subscriber.start()
            log.info("kv events: subscribed to %s at %s (replay %s)", url, source.endpoint,
                     source.replay_endpoint or "none")


def log_state(cache: ServerCache, old: str, why: str) -> None:
    """The log line of a state change."""
    if old:
        level = logging.INFO if cache.state == "exact" else logging.WARNING
        log.log(level, "kv events of %s: %s -> %s (%s)", cache.name, old, cache.state, why)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
