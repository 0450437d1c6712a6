"""Build the aiohttp application from Settings, and run it."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import aiohttp
from aiohttp import web

from pdproxy.api import OpenAIApi, openai_errors
from pdproxy.balancers import make_balancer
from pdproxy.flow import FlowTimeouts, PDFlow
from pdproxy.kv import make_adapter
from pdproxy.metrics import CONTENT_TYPE, Metrics
from pdproxy.settings import Settings
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool

log = logging.getLogger("pdproxy")

FLOW = web.AppKey("flow", PDFlow)
METRICS = web.AppKey("metrics", Metrics)
LISTEN_BACKLOG = 2048


def build_app(settings: Settings, *, rng: random.Random | None = None) -> web.Application:
    """Wire pools, policies, the flow and the routes; ValueError names a wrong policy or adapter."""
    rng = rng or random.Random()
    pools = {
        role: UpstreamPool(role, (Upstream(role, spec.url, spec.weight) for spec in specs))
        for role, specs in ((Role.PREFILL, settings.prefill_servers), (Role.DECODE, settings.decode_servers))
    }
    policy_options = {
        "rng": rng,
        "prefix_chars": settings.prefix_hash_chars,
        "vnodes": settings.prefix_hash_vnodes,
        "load_factor": settings.prefix_hash_load_factor,
    }
    metrics = Metrics()
    flow = PDFlow(
        prefill_pool=pools[Role.PREFILL],
        decode_pool=pools[Role.DECODE],
        prefill_policy=make_balancer(settings.prefill_policy, **policy_options),
        decode_policy=make_balancer(settings.decode_policy, **policy_options),
        kv=make_adapter(settings.kv_adapter),
        timeouts=FlowTimeouts(settings.connect_timeout, settings.prefill_timeout, settings.stream_idle_timeout),
        prefill_retries=settings.prefill_retries,
        metrics=metrics,
        access_log_enabled=settings.access_log,
    )

    def all_upstreams() -> Iterator[Upstream]:
        for pool in pools.values():
            yield from pool.members

    metrics.watch_upstreams(all_upstreams, (state.value for state in State))

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[openai_errors])
    app[FLOW] = flow
    app[METRICS] = metrics
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    OpenAIApi(flow, max_body_bytes=settings.max_body_bytes, upstream_api_key=api_key).add_routes(app)
    app.router.add_get("/metrics", _metrics_handler(metrics))
    app.cleanup_ctx.append(_client_session(flow))
    return app


def _metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    return handler


def _client_session(flow: PDFlow) -> Callable[[web.Application], AsyncIterator[None]]:
    """One keep-alive pooled ClientSession per application, for every upstream call."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        # auto_decompress off and no Accept-Encoding: upstream bytes reach the client as sent.
        flow.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent")
        )
        try:
            yield
        finally:
            await flow.session.close()

    return context


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start `app` on host:port (0 picks a free port); returns the runner and the base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    bound_port = server.sockets[0].getsockname()[1]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return runner, f"http://{shown_host}:{bound_port}"


async def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve(app: web.Application, settings: Settings) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    runner, url = await start_server(app, settings.host, settings.port)
    log.info(
        "pdproxy listening on http://%s:%s (prefill: %s; decode: %s)",
        settings.host, url.rsplit(":", 1)[1],
        ", ".join(s.url for s in settings.prefill_servers),
        ", ".join(s.url for s in settings.decode_servers),
    )
    try:
        await wait_for_signal()
    finally:
        log.info("pdproxy shutting down")
        await runner.cleanup()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(main)
    else:
        uvloop.run(main)
