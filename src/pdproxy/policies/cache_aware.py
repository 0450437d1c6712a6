"""`cache_aware`: send a prompt where its prefix is probably cached, unless that server's queue costs more.

pdproxy keeps its own approximate index of what each prefill server recently prefilled, built from
its routing decisions alone (no engine feedback): see `prefix_index`. For each candidate it
estimates the prompt tokens that server would have to compute (the uncached part) and picks the
least

    cost = (w × uncached tokens + load) / weight

where load is either the estimated uncached prompt tokens already in flight on the server
(`tokens`, the default: the prefill work queued ahead of this request, in the same unit) or its
in-flight requests (`requests`: w then converts tokens into requests, e.g. 0.005 means
recomputing 200 tokens costs as much as one more request in the queue). With `tokens`, w = 1 is
the greedy choice for this request's own time to first token; the default w = 2 also charges the
delay a recomputation imposes on the requests queued behind it on the server that recomputes, and
measured best in benchmarks/routing.py (w = 1 gave up a fifth of the hits on a busy tier).
One continuous cost, no on/off threshold: a long match behind a long queue loses to an idle
server once the wait outweighs the recomputation. The index is updated at decision time, so a
burst sees its own decisions.

With `--workers`, `share(feed)` makes the index the host's: each decision first replays the
other workers' decisions from the feed, then publishes its own; servers are then known by their
shared key (role and url) instead of this process's upstream id.

With KV events (`use_kv_events`), a server whose event view is exact is asked instead of the
index: the request's token blocks (as the engine hashes them) against the blocks the engine
said it holds. Servers whose view is degraded or in fallback keep the approximate estimate.
Events lag a decision by the time the request takes to reach the engine, so this policy's own
decisions of the last `RECENT` seconds count as held too: a burst of one prefix stays together.
A removal the events report after such a decision voids it (the engine evicted the block since:
on a busy server LRU turns over within the lag), so a send never outweighs newer news.

With engine load (`use_engine_load`), a server's load is the larger of this policy's count and
the engine's own running + waiting requests (in tokens: times the mean uncached tokens of a
decision), so replicas that do not see each other's requests still see a busy engine.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

from pdproxy.policies.base import RoutingRequest
from pdproxy.policies.ledger import InFlightTokens
from pdproxy.policies.prefix_index import PrefixIndex, block_keys
from pdproxy.policies.tokens import TokenCounter
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Upstream

if TYPE_CHECKING:
    from pdproxy.routing.engine_load import EngineLoads
    from pdproxy.routing.feed import DecisionFeed
    from pdproxy.routing.kv_view import KvEventsView, RequestBlocks

LOAD_MEASURES = ("tokens", "requests")
FORGET_AFTER = 60.0  # seconds a server may be absent from the candidates before its index entries go
RECENT = 2.0  # seconds this policy's own decisions count as held before the engine's events confirm them
WHOLE = sys.maxsize


class CacheAware:
    """Least `(w × estimated uncached prompt tokens + load) / weight`, ties broken by the injected rng."""

    def __init__(
        self,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        counter: TokenCounter,
        block_chars: int,
        max_blocks: int,
        weight: float,
        load: str,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        if load not in LOAD_MEASURES:
            raise ValueError(f"cache_aware load must be one of {', '.join(LOAD_MEASURES)}, got {load!r}")
        if block_chars < 1:
            raise ValueError("block_chars must be >= 1")
        if weight < 0:
            raise ValueError("cache_aware weight must be >= 0")
        self._rng = rng
        self._counter = counter
        self._block_chars = block_chars
        self._max_chars = block_chars * max_blocks  # more than a server's index could ever hold
        self._weight = weight
        self._by_tokens = load == "tokens"
        self._index = PrefixIndex(max_blocks, clock=clock, forget_after=forget_after)
        self._ledger = InFlightTokens()
        self._feed: DecisionFeed | None = None
        self._kv: KvEventsView | None = None
        self._clock = clock
        self._engines: EngineLoads | None = None
        self._mean_uncached = 0.0  # moving mean of a decision's uncached tokens: engine requests -> tokens
        # url -> token-block key -> (when this policy sent it there, the server's event mark then)
        self._recent: dict[str, dict[int, tuple[float, int]]] = {}
        self._servers: set[Hashable] = set()  # shared keys offered to this policy: others' feed entries are skipped

    def share(self, feed: DecisionFeed) -> None:
        """Learn from, and tell, the other workers of the host (cells must be set on every candidate)."""
        self._feed = feed

    def use_kv_events(self, view: KvEventsView) -> None:
        """Prefer the engines' own KV events, where exact, to the approximate index."""
        self._kv = view

    def use_engine_load(self, loads: EngineLoads) -> None:
        """Count the engines' own running and waiting requests too (never less than our own)."""
        self._engines = loads

    def _server(self, upstream: Upstream) -> Hashable:
        shared = upstream.shared
        return upstream.id if shared is None or self._feed is None else shared.key  # type: ignore[attr-defined]

    def _learn(self, server: int, keys: list[int]) -> None:
        if server in self._servers:
            self._index.insert(server, keys)

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        text = request.prompt_prefix(WHOLE)
        tokens = self._counter.count(text)
        block_chars = self._block_chars
        keys = block_keys(text if len(text) <= self._max_chars else text[:self._max_chars], block_chars)
        kv, blocks = self._kv, None
        if kv is not None and any(kv.exact(u) for u in candidates):
            body = getattr(request, "body", None)  # the client's JSON (pdproxy.request.ProxyRequest)
            blocks = kv.blocks(body) if isinstance(body, dict) else None
            if blocks is not None:
                tokens = len(blocks.tokens)  # real tokens: every candidate's estimate in the same unit
        tokens_per_block = tokens * block_chars / len(text) if text else 0.0
        index, ledger, w, by_tokens = self._index, self._ledger, self._weight, self._by_tokens
        feed, server = self._feed, self._server
        servers = [server(u) for u in candidates]
        if feed is not None:
            self._servers.update(servers)
            feed.drain(self._learn)
        index.seen(servers)
        engines = self._engines
        best: list[tuple[Upstream, Hashable, float]] = []
        best_cost = float("inf")
        for upstream, key in zip(candidates, servers, strict=True):
            held = kv.matched_tokens(upstream, blocks) if blocks is not None else None  # type: ignore[union-attr]
            if held is not None:
                held = max(held, self._recently_sent(upstream, blocks))  # type: ignore[arg-type]
                uncached = float(max(tokens - held, 0))
            else:
                uncached = max(tokens - index.matched(key, keys) * tokens_per_block, 0.0) if keys else tokens
            load = ledger.tokens(upstream) if by_tokens else upstream.load
            if engines is not None:
                busy = engines.requests(upstream)
                load = max(load, busy * (self._mean_uncached or tokens) if by_tokens else busy)
            cost = (w * uncached + load) / upstream.weight
            if cost < best_cost:
                best_cost, best = cost, [(upstream, key, uncached)]
            elif cost == best_cost:
                best.append((upstream, key, uncached))
        chosen, key, uncached = best[0] if len(best) == 1 else self._rng.choice(best)
        self._mean_uncached += (uncached - self._mean_uncached) / 32  # over about the last 32 decisions
        if blocks is not None:
            self._sent(chosen, blocks)
        if keys:
            index.insert(key, keys)
            if feed is not None:
                feed.publish(key, keys)
        if by_tokens:
            ledger.add(chosen, round(uncached))
        if isinstance(request, ProxyRequest):  # before this choice taught the index: --pd-min-prompt-tokens reads it
            request.uncached_tokens = round(uncached)
        return chosen

    def _recently_sent(self, upstream: Upstream, blocks: RequestBlocks) -> int:
        """Leading tokens of the request this policy sent to `upstream` in the last RECENT seconds."""
        recent = self._recent.get(upstream.url)
        kv = self._kv
        if not recent or kv is None:
            return 0
        size = kv.block_size(upstream)
        since = self._clock() - RECENT
        count = 0
        for key in blocks.keys(size):
            sent = recent.get(key)
            if sent is None or sent[0] < since or kv.forgot_since(upstream, key, sent[1]):
                break
            count += 1
        return count * size

    def _sent(self, upstream: Upstream, blocks: RequestBlocks) -> None:
        if self._kv is None:
            return
        size = self._kv.block_size(upstream)
        recent = self._recent.setdefault(upstream.url, {})
        sent = (self._clock(), self._kv.mark(upstream))
        for key in blocks.keys(size):
            recent[key] = sent
        if len(recent) > 4096:  # forget what the events had time to confirm (or deny)
            since = sent[0] - RECENT
            self._recent[upstream.url] = {k: v for k, v in recent.items() if v[0] >= since}

    def matched_blocks(self, upstream: Upstream, request: RoutingRequest) -> int:
        """Leading blocks of the request the index believes `upstream` holds (for tests and introspection)."""
        text = request.prompt_prefix(self._max_chars)
        return self._index.matched(self._server(upstream), block_keys(text, self._block_chars))

    def indexed_blocks(self, upstream: Upstream) -> int:
        """Blocks the index keeps for `upstream`."""
        return self._index.size(self._server(upstream))
