"""`enable_kv_events(app, settings)`: the one call that turns KV-event routing on in an app.

It finds the cache_aware policies of the flow, gives them a `KvEventsView`, runs the view's
subscriptions for the app's lifetime, and exposes each prefill server's state: in
`/health?verbose=1` (an upstream's `kv_events`), as the gauge `pdproxy_kv_events_state`, as the
counter `pdproxy_kv_events_garbage_total`, and as a log line on every change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import Counter, Gauge

from pdproxy.policies.cache_aware import CacheAware
from pdproxy.routing.kv_events import STATES, ServerCache
from pdproxy.routing.kv_subscriber import EventSource
from pdproxy.routing.kv_view import KvEventsView, log_state
from pdproxy.routing.prompt_tokens import make_prompt_tokens
from pdproxy.routing.wiring import Background
from pdproxy.settings import Settings
from pdproxy.upstreams import normalize_url

if TYPE_CHECKING:
    from pdproxy.app import App


def parse_sources(text: str) -> dict[str, EventSource]:
    """`URL=PUB[|REPLAY],...` -> {prefill url: source}; ValueError names a wrong entry."""
    sources: dict[str, EventSource] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        url, sep, endpoints = item.partition("=")
        pub, _, replay = endpoints.partition("|")
        if not sep or "://" not in pub or (replay and "://" not in replay):
            raise ValueError(f"kv_event_sources entry {item!r}: give URL=tcp://host:port[|tcp://host:replay_port]")
        sources[normalize_url(url)] = EventSource(pub.strip(), replay.strip() or None)
    return sources


def _policies(flow: Any) -> list[CacheAware]:
    found = []
    for policy in (flow.prefill.policy, flow.decode_policy):
        while not isinstance(policy, CacheAware) and hasattr(policy, "inner"):
            policy = policy.inner
        if isinstance(policy, CacheAware):
            found.append(policy)
    return found


def enable_kv_events(app: App, settings: Settings) -> KvEventsView | None:
    """Wire KV-event routing into `app` (built by build_app) when settings ask for it."""
    if not settings.kv_events:
        return None
    flow, metrics = app.flow, app.metrics
    tokens = make_prompt_tokens(str(settings.tokenizer) if settings.tokenizer else None,
                                str(settings.chat_template) if settings.chat_template else None)
    if tokens is None:
        raise ValueError("kv_events needs tokenizer (--tokenizer)")
    state = Gauge("pdproxy_kv_events_state", "1 for the state of each prefill server's KV-event view "
                  "(exact, degraded, fallback), 0 for the others.", ("upstream", "state"), registry=metrics.registry)
    garbage = Counter("pdproxy_kv_events_garbage_total", "KV-event messages ignored because they were not "
                      "vLLM KV-event batches.", ("upstream",), registry=metrics.registry)

    def on_state(cache: ServerCache, old: str, why: str) -> None:
        for name in STATES:
            state.labels(cache.name, name).set(1 if name == cache.state else 0)
        log_state(cache, old, why)

    view = KvEventsView(tokens, sources=parse_sources(settings.kv_event_sources), on_state=on_state,
                        on_garbage=lambda url: garbage.labels(url).inc())
    for policy in _policies(flow):
        policy.use_kv_events(view)
    pool = flow.prefill_pool

    async def subscriptions() -> None:
        async with aiohttp.ClientSession() as session:
            await view.run(pool, session)

    app.services.append(Background(subscriptions))
    return view
