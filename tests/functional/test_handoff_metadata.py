"""Handoff metadata discovery riding on the real active health checker, against real mock engines.

This is the wiring the app needs: `MetadataRefresher.wrap(http_probe(...))` as the checker's probe,
`prepare()` on every upstream, the board's `notify` as `on_change`.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from pdproxy.client import ClientOptions, UpstreamClient
from pdproxy.handoff.base import MetadataError
from pdproxy.handoff.discovery import PENDING, MetadataRefresher, client_fetch_json
from pdproxy.handoff.sglang import SglangHandoff
from pdproxy.handoff.vllm_mooncake import MooncakeHandoff
from pdproxy.health import ActiveHealthChecker, StateBoard, http_probe
from pdproxy.mock import MockConfig, start_mock
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool
from tests.conftest import closed_port_url


@pytest.fixture
async def http() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(ClientOptions(connect_timeout=1.0))
    yield client
    await client.close()


async def test_p_becomes_routable_with_its_metadata_and_follows_its_changes(http: UpstreamClient) -> None:
    engine, runner, url = await start_mock(MockConfig(role="prefill", protocol="sglang"))
    board = StateBoard()
    fetch = client_fetch_json(http, 1.0)
    refresher = MetadataRefresher(SglangHandoff(), fetch, on_change=lambda u: board.notify())
    checker = ActiveHealthChecker(board, refresher.wrap(http_probe(lambda: http, "/health", 1.0)), interval=0.02,
                                  rise=1, fall=1, ejection_over=lambda u: True, rng=random.Random(0))
    upstream = Upstream(Role.PREFILL, url)
    pool = UpstreamPool(Role.PREFILL, [upstream])
    refresher.prepare(upstream)
    assert upstream.meta_error == PENDING and pool.routable() == ()
    checker.watch(upstream)
    try:
        await board.wait_for(lambda: pool.routable() == (upstream,), 2)
        assert upstream.meta == {"bootstrap_port": engine.bootstrap_port}
        first_port = engine.bootstrap_port

        port = int(url.rsplit(":", 1)[1])
        await runner.cleanup()  # P restarts: same HTTP port, a new bootstrap port
        with socket.socket() as hold:  # keep the old bootstrap port taken, so the new one differs
            hold.bind(("127.0.0.1", first_port))
            engine, runner, _ = await start_mock(MockConfig(role="prefill", protocol="sglang"), port=port)
        assert engine.bootstrap_port != first_port
        await board.wait_for(lambda: upstream.meta.get("bootstrap_port") == engine.bootstrap_port, 2)
        assert upstream.routable and upstream.state is State.HEALTHY
    finally:
        await checker.stop()
        await runner.cleanup()


async def test_a_p_whose_metadata_probe_fails_is_unroutable_with_the_reason(http: UpstreamClient,
                                                                            ) -> None:
    # Healthy to /health, but not an SGLang server: /get_server_info is missing.
    app = web.Application()
    app.router.add_get("/health", lambda _r: web.Response())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    refresher = MetadataRefresher(SglangHandoff(), client_fetch_json(http, 1.0))
    upstream = Upstream(Role.PREFILL, url)
    refresher.prepare(upstream)
    try:
        probe = refresher.wrap(http_probe(lambda: http, "/health", 1.0))
        assert await asyncio.wait_for(probe(upstream), 2) is None  # health itself is fine
        assert not upstream.routable
        assert upstream.meta_error == f"GET {url}/get_server_info answered 404"
        assert upstream.describe()["meta_error"] == upstream.meta_error
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("case", ["refused", "not-json", "timeout", "no-client", "404"])
async def test_fetch_json_failures_are_metadata_errors(case: str) -> None:
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/text", lambda _r: web.Response(text="{nope"))
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    url = {"refused": closed_port_url() + "/x", "not-json": base + "/text", "timeout": base + "/slow",
           "no-client": base + "/text", "404": base + "/nothing"}[case]
    upstream_client = UpstreamClient(ClientOptions(connect_timeout=1.0))
    if case == "no-client":
        await upstream_client.close()
    fetch = client_fetch_json(upstream_client, 0.2)
    try:
        with pytest.raises(MetadataError) as info:
            await asyncio.wait_for(fetch(url), 2)
        expected = {"refused": "failed", "not-json": "not JSON", "timeout": "0.2",
                    "no-client": "closed", "404": "answered 404"}[case]
        assert expected in str(info.value)
    finally:
        release.set()
        await upstream_client.close()
        await runner.cleanup()


async def test_discovery_on_pdproxys_own_client_against_the_mooncake_mock() -> None:
    engine, runner, url = await start_mock(MockConfig(role="prefill", protocol="mooncake", dp_size=2))
    client = UpstreamClient(ClientOptions())
    try:
        handoff = MooncakeHandoff({url: {"bootstrap_port": engine.bootstrap_port}})
        upstream = Upstream(Role.PREFILL, url)
        refresher = MetadataRefresher(handoff, client_fetch_json(client, 1.0))
        refresher.prepare(upstream)
        assert await asyncio.wait_for(refresher.refresh(upstream), 2) is True
        assert upstream.routable and [rank for rank, _ in upstream.meta["engine_ids"]] == [0, 1]
    finally:
        await client.close()
        await runner.cleanup()
