"""Build the aiohttp application from Settings, and run it."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from pdproxy.admin import AdminApi
from pdproxy.admission import AdmissionQueue
from pdproxy.api import OpenAIApi, openai_errors
from pdproxy.flow import FlowLimits, FlowTimeouts, PDFlow
from pdproxy.health import ActiveHealthChecker, StateBoard, http_probe
from pdproxy.kv import make_adapter
from pdproxy.membership import Hooks, Membership, read_state_file
from pdproxy.metrics import CONTENT_TYPE, Metrics
from pdproxy.outlier import ConsecutiveFailureDetector, NoOutlierDetection, OutlierDetector
from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.settings import Settings
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool

log = logging.getLogger("pdproxy")

FLOW = web.AppKey("flow", PDFlow)
METRICS = web.AppKey("metrics", Metrics)
BOARD = web.AppKey("board", StateBoard)
MEMBERSHIP = web.AppKey("membership", Membership)
ADMIN = web.AppKey("admin", AdminApi)  # present when the admin API has its own listener
LISTEN_BACKLOG = 2048
SHUTDOWN_GRACE = 1.0  # seconds aiohttp waits for handlers at cleanup, after our own drain


def build_app(settings: Settings, *, rng: random.Random | None = None, persist: bool = True) -> web.Application:
    """Wire pools, policies, health, membership, the flow and the routes.

    `persist=False` restores from `settings.state_file` but never writes it: with several worker
    processes only worker 0 writes, so the file has one writer.
    ValueError names a wrong policy or adapter; StateFileError a state file that cannot be restored.
    """
    rng = rng or random.Random()
    caps = {Role.PREFILL: settings.prefill_max_in_flight, Role.DECODE: settings.decode_max_in_flight}
    pools = {role: UpstreamPool(role, members) for role, members in _initial_members(settings, caps).items()}
    for role, pool in pools.items():
        if not pool.members:
            raise ValueError(f"no {role.value} servers (the state file {settings.state_file} lists none)")
    policy_options = PolicyOptions(
        prefix_chars=settings.prefix_hash_chars, vnodes=settings.prefix_hash_vnodes,
        load_factor=settings.prefix_hash_load_factor, block_chars=settings.cache_block_chars,
        index_max_blocks=settings.cache_index_max_blocks, cache_weight=settings.cache_aware_weight,
        cache_load=settings.cache_aware_load, chars_per_token=settings.chars_per_token,
        tokenizer=str(settings.tokenizer) if settings.tokenizer else None,
    )
    metrics = Metrics()
    board = StateBoard()
    admission = AdmissionQueue(settings.queue_size, settings.queue_timeout)
    health_on = settings.health_interval > 0
    outlier: OutlierDetector = NoOutlierDetection()
    if settings.eject_after:
        outlier = ConsecutiveFailureDetector(
            board, pools, eject_after=settings.eject_after, base_time=settings.eject_base_time,
            max_time=settings.eject_max_time, max_share=settings.eject_max_share, return_on_expiry=not health_on,
            clock=time.monotonic,
        )
    membership = Membership(pools, board, warmup=health_on, state_file=settings.state_file if persist else None)

    def on_release(upstream: Upstream) -> None:
        admission.wake()
        membership.lease_released(upstream)

    flow = PDFlow(
        prefill_pool=pools[Role.PREFILL],
        decode_pool=pools[Role.DECODE],
        prefill_policy=make_balancer(settings.prefill_policy, policy_options, rng=rng),
        decode_policy=make_balancer(settings.decode_policy, policy_options, rng=rng),
        kv=make_adapter(settings.kv_adapter),
        timeouts=FlowTimeouts(
            connect=settings.connect_timeout, prefill=settings.prefill_timeout,
            prefill_deadline=settings.prefill_deadline, decode_first_byte=settings.decode_first_byte_timeout,
            stream_idle=settings.stream_idle_timeout, decode_total=settings.decode_timeout,
        ),
        limits=FlowLimits(settings.prefill_retries, settings.flow_retries, settings.max_concurrency),
        admission=admission,
        outlier=outlier,
        metrics=metrics,
        access_log=settings.access_log_format if settings.access_log else "off",
        on_release=on_release,
    )
    checker = ActiveHealthChecker(
        board, http_probe(lambda: flow.session, settings.health_path, settings.health_timeout),
        interval=settings.health_interval, rise=settings.health_rise, fall=settings.health_fall,
        ejection_over=outlier.ejection_over, rng=rng,
    ) if health_on else None
    membership.hooks = Hooks(
        cut_streams=flow.cut_streams,
        forget=lambda upstream: metrics.forget_upstream(upstream.role.value, upstream.url),
        changed=lambda action: metrics.admin_changes.labels(action).inc(),
    )
    if checker is not None:
        membership.hooks.watch, membership.hooks.unwatch = checker.watch, checker.unwatch
    membership.save_now()  # the state file reflects what runs from the start

    def on_transition(upstream: Upstream, old: State, new: State, reason: str) -> None:
        if new is State.EJECTED:
            metrics.ejections.labels(upstream.role.value, upstream.url).inc()
        admission.wake()  # a recovered upstream may let a queued request go; a lost one may fail it fast

    board.listen(on_transition)
    metrics.watch_upstreams(membership.members, (state.value for state in State if state is not State.REMOVED))
    metrics.queue_waiting.set_function(lambda: admission.waiting)

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[openai_errors])
    app[FLOW] = flow
    app[METRICS] = metrics
    app[BOARD] = board
    app[MEMBERSHIP] = membership
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    OpenAIApi(flow, max_body_bytes=settings.max_body_bytes, upstream_api_key=api_key).add_routes(app)
    if settings.metrics_port is None:
        app.router.add_get("/metrics", _metrics_handler(metrics))
    admin = _admin_api(settings, membership, caps)
    if settings.admin_port is None:
        admin.add_routes(app)
    else:
        app[ADMIN] = admin
    app.cleanup_ctx.append(_client_session(flow))
    if checker is not None:
        app.cleanup_ctx.append(_health_checks(checker, membership))
    if settings.kv_events or settings.engine_metrics_interval:  # pdproxy.routing: the engines' own view
        from pdproxy.routing.wiring import enable_routing

        enable_routing(app, settings)
    return app


def _initial_members(settings: Settings, caps: dict[Role, int]) -> dict[Role, list[Upstream]]:
    """The state file's membership when it exists (it holds runtime changes), else the configured one."""
    members: dict[Role, list[Upstream]] = {Role.PREFILL: [], Role.DECODE: []}
    saved = read_state_file(settings.state_file) if settings.state_file else None
    if saved is not None:
        log.info("restoring %d upstreams from the state file %s", len(saved), settings.state_file)
        for spec in saved:
            state = State.DRAINING if spec.drained else State.UNKNOWN
            members[spec.role].append(Upstream(spec.role, spec.url, spec.weight, spec.max_in_flight, state=state))
        return members
    for role, specs in ((Role.PREFILL, settings.prefill_servers), (Role.DECODE, settings.decode_servers)):
        members[role] = [Upstream(role, spec.url, spec.weight, caps[role]) for spec in specs]
    return members


def _admin_api(settings: Settings, membership: Membership, caps: dict[Role, int]) -> AdminApi:
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    return AdminApi(membership, token=token, default_caps=caps)


def build_admin_app(admin: AdminApi) -> web.Application:
    """The admin routes alone, for a separate listener (`--admin-port`)."""
    app = web.Application(middlewares=[openai_errors])
    admin.add_routes(app)
    return app


def build_metrics_app(metrics: Metrics) -> web.Application:
    """`/metrics` alone, for a separate listener (`--metrics-port`)."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics_handler(metrics))
    return app


def _metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    return handler


def _health_checks(
    checker: ActiveHealthChecker, membership: Membership
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Active probes run while the application runs (after the client session exists)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        checker.start(membership.members())
        try:
            yield
        finally:
            await checker.stop()

    return context


def _client_session(flow: PDFlow) -> Callable[[web.Application], AsyncIterator[None]]:
    """One keep-alive pooled ClientSession per application, for every upstream call."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        # auto_decompress off and no Accept-Encoding: upstream bytes reach the client as sent.
        # No cookie jar: cookies one upstream sets must never ride along on other clients' requests.
        flow.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        try:
            yield
        finally:
            await flow.session.close()

    return context


async def start_server(app: web.Application, host: str, port: int, *,
                       reuse_port: bool = False) -> tuple[web.AppRunner, str]:
    """Start `app` on host:port (0 picks a free port); returns the runner and the base URL.

    `reuse_port`: share the port with other processes' sockets (SO_REUSEPORT; worker processes)."""
    # The drain happens before cleanup; what is left by then is cut after a short grace period.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port or None)
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
    """Run the proxy until SIGINT/SIGTERM, then drain: /health and new requests get 503 at once,
    requests in flight run to completion for up to `drain_timeout` seconds."""
    runners = []
    try:
        runner, url = await start_server(app, settings.host, settings.port)
        runners.append(runner)
        log.info(
            "pdproxy listening on http://%s:%s (prefill: %s; decode: %s)",
            settings.host, url.rsplit(":", 1)[1],
            ", ".join(s.url for s in settings.prefill_servers),
            ", ".join(s.url for s in settings.decode_servers),
        )
        if settings.metrics_port is not None:
            runner, _ = await start_server(build_metrics_app(app[METRICS]), settings.host, settings.metrics_port)
            runners.append(runner)
            log.info("metrics on http://%s:%s/metrics", settings.host, settings.metrics_port)
        if ADMIN in app:
            runner, admin_url = await start_server(build_admin_app(app[ADMIN]), settings.admin_host,
                                                   settings.admin_port or 0)
            runners.append(runner)
            log.info("admin API on %s/admin/upstreams", admin_url)
        await wait_for_signal()
        await drain(app[FLOW], settings.drain_timeout)
    finally:
        for runner in runners:
            await runner.cleanup()
        log.info("pdproxy stopped")


async def drain(flow: PDFlow, timeout: float) -> None:
    """Refuse new requests and wait up to `timeout` seconds for those in flight."""
    flow.start_drain()
    log.info("draining: %d requests in flight, waiting up to %gs (a second signal stops at once)",
             flow.in_flight, timeout)
    try:
        await asyncio.wait_for(flow.wait_idle(), timeout)
    except asyncio.TimeoutError:
        log.warning("drain timeout: cutting %d requests still in flight", flow.in_flight)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(main)
    else:
        uvloop.run(main)
