"""Shared fixtures: real mock engines and a real proxy, all on loopback port 0."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pdproxy.app import BOARD, FLOW, METRICS, build_app, start_server
from pdproxy.metrics import Metrics
from pdproxy.mock import MockConfig, MockEngine, start_mock
from pdproxy.proxy.orchestrator import Orchestrator
from pdproxy.settings import Settings
from pdproxy.upstreams import State, Upstream


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PDPROXY_* settings leak in from the developer's shell."""
    for name in list(os.environ):
        if name.upper().startswith("PDPROXY_"):
            monkeypatch.delenv(name)


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def needs_tool(path: str | None, install: str) -> pytest.MarkDecorator:
    """Skip where a system tool is missing on a developer's machine, but never in CI (CI=true): .ci/run
    installs every tool the tests use, so a skip there would hide a broken install step; the test runs and
    fails on the missing tool instead."""
    return pytest.mark.skipif(path is None and not IN_CI, reason=f"not installed ({install})")


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Cluster:
    """Mock P and D engines behind a running proxy."""

    prefill: list[MockEngine]
    decode: list[MockEngine]
    url: str
    app: web.Application
    prefill_urls: list[str]
    decode_urls: list[str]
    runners: list[web.AppRunner] = field(default_factory=list)
    engine_runners: dict[int, web.AppRunner] = field(default_factory=dict)  # id(engine) -> its runner

    async def kill(self, engine: MockEngine) -> None:
        """Stop an engine: its open connections drop, its port refuses."""
        await self.engine_runners.pop(id(engine)).cleanup()

    async def revive(self, engine: MockEngine) -> MockEngine:
        """Start a fresh engine with the same config on the killed one's port; it takes its place."""
        engines = self.prefill if engine in self.prefill else self.decode
        urls = self.prefill_urls if engines is self.prefill else self.decode_urls
        index = engines.index(engine)
        port = int(urls[index].rsplit(":", 1)[1])
        fresh, runner, _ = await start_mock(engine.config, port=port)
        engines[index] = fresh
        self.engine_runners[id(fresh)] = runner
        return fresh

    async def wait_any_prefill(self, n: int = 1) -> int:
        """Wait until some prefill engine received `n` requests; return its index."""
        waits = [asyncio.ensure_future(e.wait_for_requests(n)) for e in self.prefill]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED, timeout=5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return next(i for i, e in enumerate(self.prefill) if len(e.requests) >= n)

    async def wait_for(self, check: Callable[[], bool], timeout: float = 5) -> None:
        """Wait until `check()` holds, re-checked on every upstream state or membership change."""
        await self.app[BOARD].wait_for(check, timeout)

    async def wait_state(self, url: str, *states: State, timeout: float = 5) -> None:
        """Wait until the upstream at `url` is in one of `states` (woken by every state change)."""
        upstream = self.upstream(url)
        await self.app[BOARD].wait_for(lambda: upstream.state in states, timeout)

    @property
    def flow(self) -> Orchestrator:
        return self.app[FLOW]

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    def upstreams(self) -> list[Upstream]:
        return [*self.flow.prefill_pool.members, *self.flow.decode_pool.members]

    def upstream(self, url: str) -> Upstream:
        return next(u for u in self.upstreams() if u.url == url)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def assert_no_leaks(self) -> None:
        """Every request finished and every lease was released."""
        await asyncio.wait_for(self.flow.wait_idle(), 5)
        leaked = {u.url: u.in_flight for u in self.upstreams() if u.in_flight}
        assert not leaked, f"in-flight leases leaked: {leaked}"
        assert self.flow.in_flight == 0
        assert self.metric("pdproxy_requests_in_flight") == 0


ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def cluster_factory() -> AsyncIterator[ClusterFactory]:
    """Build clusters; after the test, check no lease leaked and stop everything."""
    clusters: list[Cluster] = []

    async def make(
        n_prefill: int = 2,
        n_decode: int = 1,
        *,
        prefill_config: MockConfig | None = None,
        decode_config: MockConfig | None = None,
        extra_prefill: tuple[str, ...] = (),
        extra_decode: tuple[str, ...] = (),
        prefill_weights: tuple[int, ...] = (),
        seed: int = 0,
        **settings: Any,
    ) -> Cluster:
        engine_runners: dict[int, web.AppRunner] = {}
        prefill, prefill_urls, decode, decode_urls = [], list(extra_prefill), [], list(extra_decode)
        for engines, urls, count, config in (
            (prefill, prefill_urls, n_prefill, prefill_config or MockConfig(role="prefill")),
            (decode, decode_urls, n_decode, decode_config or MockConfig(role="decode")),
        ):
            for _ in range(count):
                engine, runner, url = await start_mock(config)
                engines.append(engine)
                urls.append(url)
                engine_runners[id(engine)] = runner
        settings.setdefault("access_log", False)
        servers = [f"{url}={weight}" for url, weight in zip(prefill_urls, prefill_weights, strict=False)]
        servers += prefill_urls[len(servers):]
        app = build_app(
            Settings(prefill_servers=",".join(servers), decode_servers=",".join(decode_urls), **settings),
            rng=random.Random(seed),
        )
        proxy_runner, url = await start_server(app, "127.0.0.1", 0)
        cluster = Cluster(prefill, decode, url, app, prefill_urls, decode_urls, [proxy_runner], engine_runners)
        clusters.append(cluster)
        return cluster

    yield make
    await check_and_stop(clusters)


async def check_and_stop(clusters: list[Cluster]) -> None:
    """After a test: no lease leaked in any cluster; then every proxy and engine stops, whatever was found."""
    try:
        for cluster in clusters:
            await cluster.assert_no_leaks()
    finally:
        for cluster in clusters:
            for runner in [*cluster.runners, *cluster.engine_runners.values()]:
                await runner.cleanup()


@pytest.fixture
async def cluster(cluster_factory: ClusterFactory) -> Cluster:
    """The default shape: 2 prefill engines and 1 decode engine."""
    return await cluster_factory()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Serve hand-written upstream apps (protocol corner cases the mock does not cover) on port 0."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]
