"""`enable_routing(app, settings)`: the one call build_app makes to route on the engines' own view.

KV-cache events (`--kv-events`, pdproxy.routing.kv_wiring) and engine load from /metrics
(`--engine-metrics-interval`, pdproxy.routing.engine_load); each is imported only when on.
"""

from __future__ import annotations

from aiohttp import web

from pdproxy.settings import Settings


def enable_routing(app: web.Application, settings: Settings) -> None:
    if settings.kv_events:
        from pdproxy.routing.kv_wiring import enable_kv_events

        enable_kv_events(app, settings)
    if settings.engine_metrics_interval:
        from pdproxy.routing.engine_load import enable_engine_load

        enable_engine_load(app, settings.engine_metrics_interval)
