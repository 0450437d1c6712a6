"""Build one pdproxy process from Settings, and run it."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdproxy.admin import AdminApi
from pdproxy.admission import AdmissionQueue
from pdproxy.client import ClientOptions, UpstreamClient
from pdproxy.discovery import Discovery, build_discovery
from pdproxy.handoff import Handoff, make_handoff
from pdproxy.handoff.discovery import MetadataRefresher, MetadataWithoutHealth, Probe, client_fetch_json
from pdproxy.health import ActiveHealthChecker, StateBoard, http_probe
from pdproxy.http.api import OpenAIApi
from pdproxy.http.auth import ClientKeys
from pdproxy.http.limits import ServerLimits
from pdproxy.http.parse_process import ParseProcess
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.http.router import Handler, Router
from pdproxy.http.server import Server
from pdproxy.http.server import start_server as start_http_server
from pdproxy.http.validate import LoopGuard
from pdproxy.livez import LIVEZ_PATH, livez_handler
from pdproxy.membership import Hooks, Membership, read_state_file
from pdproxy.metrics import CONTENT_TYPE, Metrics
from pdproxy.model_discovery import discovering_probe
from pdproxy.outlier import ConsecutiveFailureDetector, NoOutlierDetection, OutlierDetector
from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.policies.tokens import make_token_counter
from pdproxy.proxy.fanout import FanOut
from pdproxy.proxy.hedge import HedgeBudget
from pdproxy.proxy.model_list import ModelList
from pdproxy.proxy.orchestrator import FlowLimits, FlowTimeouts, Orchestrator
from pdproxy.proxy.passthrough import Passthrough, PassTimeouts
from pdproxy.proxy.record import RequestRecord
from pdproxy.served_models import ModelTable
from pdproxy.settings import Settings
from pdproxy.tracing import Tracing, TracingService, build_tracing
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool

log = logging.getLogger("pdproxy")

# Keys of an App's parts (`app[FLOW]`), for the worker control plane and the tests.
FLOW, METRICS, BOARD, MEMBERSHIP, ADMIN = "flow", "metrics", "board", "membership", "admin"
LISTEN_BACKLOG = 2048


class Service(Protocol):
    """Something an App runs beside the requests: started with it, stopped before it closes."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class App:
    """Everything one pdproxy process runs: the orchestrator and what feeds it, and its routes.

    `admin` is set only when the admin API has its own listener (`--admin-port`); otherwise its routes
    are on the main router."""

    router: Router
    flow: Orchestrator
    metrics: Metrics
    board: StateBoard
    membership: Membership
    client: UpstreamClient
    limits: ServerLimits
    checker: ActiveHealthChecker | None = None
    listening: list[tuple[str, int]] = field(default_factory=list)
    admin: AdminApi | None = None
    discovery: Discovery | None = None
    services: list[Service] = field(default_factory=list)  # run beside the requests (pdproxy.routing's)
    _started: bool = field(default=False, repr=False)

    def on_server_event(self, reason: str, request: Request | None, status: int) -> None:
        """A refusal the HTTP server made itself (a client-side limit, malformed HTTP): a metric and, when it
        answered, an access-log line. Disconnects of requests the orchestrator serves are counted there."""
        if reason == "client_closed":
            return
        self.metrics.client_refusals.labels(reason).inc()
        if status:
            endpoint = request.path if request is not None else "-"
            remote = request.remote or "-" if request is not None else "-"
            self.flow.account(RequestRecord("-", endpoint, time.perf_counter(), remote, status=status, error=reason,
                                            stage="client"), metrics=False)

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None

    async def startup(self) -> None:
        """Start what runs beside the requests (active health checks, discovery)."""
        if not self._started:
            self._started = True
            if self.checker is not None:
                self.checker.start(self.membership.members())
            if self.discovery is not None:
                self.discovery.start()
            for service in self.services:
                service.start()

    async def cleanup(self) -> None:
        """Stop discovery and the health checks, and close every upstream connection."""
        if self._started:
            self._started = False
            for service in self.services:
                await service.stop()
            if self.discovery is not None:
                await self.discovery.stop()
            if self.checker is not None:
                await self.checker.stop()
            await self.client.close()


def build_app(settings: Settings, *, rng: random.Random | None = None, persist: bool = True,
              tracing: Tracing | None = None) -> App:
    """Wire pools, policies, health, membership, the orchestrator and the routes.

    `persist=False` restores from `settings.state_file` but never writes it: with several worker
    processes only worker 0 writes, so the file has one writer.
    ValueError names a wrong policy or adapter; StateFileError a state file that cannot be restored.
    `tracing` replaces the one `otel_endpoint` builds (tests: the SDK's in-memory exporter).
    """
    rng = rng or random.Random()
    caps = {Role.PREFILL: settings.prefill_max_in_flight, Role.DECODE: settings.decode_max_in_flight}
    pools = {role: UpstreamPool(role, members, panic_threshold=settings.healthy_panic_threshold)
             for role, members in _initial_members(settings, caps).items()}
    for role, pool in pools.items():
        if not pool.members and role.value not in settings.discovered_roles():
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
    membership = Membership(pools, board, warmup=health_on, state_file=settings.state_file if persist else None,
                            max_per_role=settings.max_upstreams)

    def on_release(upstream: Upstream) -> None:
        admission.wake()
        membership.lease_released(upstream)

    def on_stale_retry(url: str) -> None:
        """A reused connection failed before any byte and the call went again on a fresh one: its own outcome,
        never counted against the upstream."""
        for pool in pools.values():
            upstream = pool.find(url)
            if upstream is not None:
                metrics.upstream_requests.labels(pool.role.value, url, "stale_retry").inc()
                return

    client = UpstreamClient(ClientOptions(connect_timeout=settings.connect_timeout,
                                          keepalive_timeout=settings.upstream_keepalive_timeout),
                            on_stale_retry=on_stale_retry)
    limits = FlowLimits(settings.prefill_retries, settings.flow_retries, settings.max_concurrency)
    model_table = ModelTable(pools, panic_threshold=settings.healthy_panic_threshold)
    handoff = make_handoff(settings.kv_adapter, settings.handoff_meta, concurrent_ok=True)
    flow = Orchestrator(
        prefill_pool=pools[Role.PREFILL],
        decode_pool=pools[Role.DECODE],
        prefill_policy=make_balancer(settings.prefill_policy, policy_options, rng=rng),
        decode_policy=make_balancer(settings.decode_policy, policy_options, rng=rng),
        handoff=handoff,
        client=client,
        timeouts=FlowTimeouts(
            connect=settings.connect_timeout, prefill=settings.prefill_timeout,
            prefill_deadline=settings.prefill_deadline, decode_first_byte=settings.decode_first_byte_timeout,
            stream_idle=settings.stream_idle_timeout, decode_total=settings.decode_timeout,
            decode_response=settings.decode_response_timeout,
        ),
        limits=limits,
        admission=admission,
        outlier=outlier,
        metrics=metrics,
        access_log_format=settings.access_log_format if settings.access_log else "off",
        on_release=on_release,
        hedging=HedgeBudget(multiple=settings.prefill_hedge_multiple, floor=settings.prefill_hedge_floor,
                            budget=settings.prefill_hedge_budget, min_hedges=settings.prefill_hedge_min),
        pd_min_prompt_tokens=settings.pd_min_prompt_tokens,
        token_counter=make_token_counter(str(settings.tokenizer) if settings.tokenizer else None,
                                         settings.chars_per_token) if settings.pd_min_prompt_tokens else None,
        tracing=tracing or build_tracing(settings.otel_endpoint, settings.otel_service_name),
        models=model_table,
    )
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    refresher = MetadataRefresher(handoff, client_fetch_json(client, settings.health_timeout),
                                  on_change=lambda upstream: (board.notify(), admission.wake()))
    probe = _probe_with_metadata(handoff, refresher,
                                 http_probe(lambda: client, settings.health_path, settings.health_timeout))
    probe = discovering_probe(probe, lambda: client, timeout=settings.health_timeout,
                              headers=f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b"",
                              changed=lambda upstream: model_table.rebuild())
    checker = ActiveHealthChecker(
        board, probe, interval=settings.health_interval, rise=settings.health_rise, fall=settings.health_fall,
        ejection_over=outlier.ejection_over, rng=rng,
    ) if health_on else None
    def forget(upstream: Upstream) -> None:  # a removed upstream: its series and its outlier record go
        metrics.forget_upstream(upstream.role.value, upstream.url)
        outlier.forget(upstream)

    membership.hooks = Hooks(
        cut_streams=flow.cut_streams,
        forget=forget,
        changed=lambda action: metrics.admin_changes.labels(action).inc(),
        regroup=model_table.rebuild,
    )
    if checker is not None:
        membership.hooks.watch, membership.hooks.unwatch = _watch_with_metadata(refresher, checker.watch), \
            checker.unwatch
        for upstream in membership.members():  # configured and restored: unroutable until their metadata is in
            refresher.prepare(upstream)
    services: list[Service] = []
    if checker is None and handoff.meta_roles:  # no probes to ride on: discover once per upstream instead
        once = MetadataWithoutHealth(refresher)
        membership.hooks.watch, membership.hooks.unwatch = once.watch, once.unwatch
        for upstream in membership.members():
            once.watch(upstream)
        services.append(once)
    membership.save_now()  # the state file reflects what runs from the start

    def on_transition(upstream: Upstream, old: State, new: State, reason: str) -> None:
        if new is State.EJECTED:
            metrics.ejections.labels(upstream.role.value, upstream.url).inc()
        admission.wake()  # a recovered upstream may let a queued request go; a lost one may fail it fast

    board.listen(on_transition)
    metrics.watch_upstreams(membership.members, (state.value for state in State if state is not State.REMOVED))
    metrics.watch_pools(pools.values())
    metrics.queue_waiting.set_function(lambda: admission.waiting)

    router = Router()
    passthrough = Passthrough(
        flow=flow, policies={Role.PREFILL: flow.prefill.policy, Role.DECODE: flow.decode_policy}, client=client,
        timeouts=PassTimeouts(settings.decode_first_byte_timeout, settings.stream_idle_timeout,
                              settings.decode_timeout),
        retries=settings.prefill_retries, max_answer_bytes=limits.max_answer_bytes, on_release=on_release)
    keys = settings.client_keys()
    client_keys = ClientKeys(keys, default_max_in_flight=settings.api_key_max_in_flight) if keys else None
    model_list = ModelList(model_table, client, timeout=settings.decode_first_byte_timeout,
                           max_answer_bytes=limits.max_answer_bytes, on_release=on_release)
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    parser = ParseProcess()  # large bodies parsed off the loop; stopped (killed) with the app's services
    services.append(parser)
    OpenAIApi(flow, passthrough, upstream_api_key=api_key, loop_guard=LoopGuard.create(),
              fanout=FanOut(flow, settings.max_fanout),
              route_pools={route: Role(pool) for route, pool in settings.route_pools.items()},
              client_keys=client_keys, model_list=model_list, admin_token=admin_token,
              parser=parser).add_routes(router)
    router.add("GET", LIVEZ_PATH, livez_handler(lambda: flow.draining))  # liveness: never asks an engine
    if settings.metrics_port is None:
        router.add("GET", "/metrics", metrics_handler(metrics))
    listening: list[tuple[str, int]] = []  # (host, port) of this process's listeners, once they listen
    admin = _admin_api(settings, membership, caps, listening)
    if settings.admin_port is None:
        admin.add_routes(router)
    server_limits = settings.server_limits()
    app = App(router, flow, metrics, board, membership, client, server_limits, checker, listening,
              admin if settings.admin_port is not None else None,
              build_discovery(settings, membership, metrics, caps), services)
    if flow.tracing.enabled:
        app.services.append(TracingService(flow.tracing))  # flushes the spans still buffered at exit
    if settings.kv_events or settings.engine_metrics_interval:  # pdproxy.routing: the engines' own view
        from pdproxy.routing.wiring import enable_routing

        enable_routing(app, settings)
    return app


def _probe_with_metadata(handoff: Handoff, refresher: MetadataRefresher, probe: Probe) -> Probe:
    """The health probe, followed by handoff metadata discovery when the handoff needs any."""
    return refresher.wrap(probe) if handoff.meta_roles else probe


def _watch_with_metadata(refresher: MetadataRefresher, watch: Callable[[Upstream], None]) -> Callable[[Upstream], None]:
    """Start probing an upstream that joined (admin, discovery) once it is marked pending its metadata."""

    def start(upstream: Upstream) -> None:
        refresher.prepare(upstream)
        watch(upstream)

    return start


def _initial_members(settings: Settings, caps: dict[Role, int]) -> dict[Role, list[Upstream]]:
    """The state file's membership when it exists (it holds runtime changes), else the configured one."""
    members: dict[Role, list[Upstream]] = {Role.PREFILL: [], Role.DECODE: []}
    saved = read_state_file(settings.state_file) if settings.state_file else None
    if saved is not None:
        log.info("restoring %d upstreams from the state file %s", len(saved), settings.state_file)
        for spec in saved:
            state = State.DRAINING if spec.drained else State.UNKNOWN
            members[spec.role].append(Upstream(spec.role, spec.url, spec.weight, spec.max_in_flight, state=state,
                                               models=spec.models, models_fixed=bool(spec.models)))
        return members
    for role, specs in ((Role.PREFILL, settings.prefill_servers), (Role.DECODE, settings.decode_servers)):
        members[role] = [Upstream(role, spec.url, spec.weight, caps[role], models=spec.models,
                                  models_fixed=bool(spec.models)) for spec in specs]
    return members


def _admin_api(settings: Settings, membership: Membership, caps: dict[Role, int],
               listening: list[tuple[str, int]]) -> AdminApi:
    """The admin API; it refuses an upstream that is one of this process's own listeners (a loop)."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    return AdminApi(membership, token=token, default_caps=caps, listen_addresses=lambda: listening,
                    local_hosts=(socket.gethostname(),))


def admin_router(admin: AdminApi) -> Router:
    """The admin routes alone, for a separate listener (`--admin-port`)."""
    router = Router()
    admin.add_routes(router)
    return router


def metrics_router(metrics: Metrics) -> Router:
    """`/metrics` alone, for a separate listener (`--metrics-port`)."""
    router = Router()
    router.add("GET", "/metrics", metrics_handler(metrics))
    return router


def metrics_handler(metrics: Metrics) -> Handler:
    async def handler(request: Request) -> Response:
        return Response(body=metrics.render(), content_type=CONTENT_TYPE)

    return handler


class Runner:
    """A started listener (and, for the main one, the App behind it): `cleanup()` stops both."""

    def __init__(self, server: Server, app: App | None = None) -> None:
        self.server = server
        self.app = app

    async def cleanup(self) -> None:
        await self.server.close()
        if self.app is not None:
            await self.app.cleanup()


async def start_server(app: App | Router, host: str, port: int, *, reuse_port: bool = False,
                       limits: ServerLimits | None = None) -> tuple[Runner, str]:
    """Start `app` (a whole App, or a bare Router) on host:port (0 picks a free port); the runner and
    the base URL. `reuse_port`: share the port with other processes' sockets (SO_REUSEPORT; workers)."""
    on_event = None
    if isinstance(app, App):
        await app.startup()
        router, limits, on_event = app.router, limits or app.limits, app.on_server_event
    else:
        router, limits = app, limits or ServerLimits()
    try:
        server = await start_http_server(router, host, port, limits=limits, reuse_port=reuse_port,
                                         backlog=LISTEN_BACKLOG, on_event=on_event)
    except BaseException:
        if isinstance(app, App):
            await app.cleanup()
        raise
    if isinstance(app, App):
        app.listening.append((host, server.port))
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return Runner(server, app if isinstance(app, App) else None), f"http://{shown_host}:{server.port}"


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


async def serve(app: App, settings: Settings) -> None:
    """Run the proxy until SIGINT/SIGTERM, then drain: /health and new requests get 503 at once,
    requests in flight run to completion for up to `drain_timeout` seconds."""
    runners: list[Runner] = []
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
            runner, _ = await start_server(metrics_router(app.metrics), settings.host, settings.metrics_port)
            runners.append(runner)
            log.info("metrics on http://%s:%s/metrics", settings.host, settings.metrics_port)
        if app.admin is not None:
            runner, admin_url = await start_server(admin_router(app.admin), settings.admin_host,
                                                   settings.admin_port or 0)
            runners.append(runner)
            log.info("admin API on %s/admin/upstreams", admin_url)
        await wait_for_signal()
        await drain(app.flow, settings.drain_timeout)
    finally:
        for runner in runners:
            await runner.cleanup()
        log.info("pdproxy stopped")


async def drain(flow: Orchestrator, timeout: float) -> None:
    """Refuse new requests (503, so load balancers and clients go elsewhere) and wait up to `timeout`
    seconds for those in flight; closing the listeners afterwards closes the idle client connections."""
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
