"""`pdproxy serve --workers 4`: caps hold across the workers under load, and admission waits for a slot."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdproxy.app import build_app, start_server
from pdproxy.mock import MockConfig, start_mock
from pdproxy.routing.load import WorkerRow
from pdproxy.routing.share import share_routing
from pdproxy.routing.table import SharedTable, server_key
from pdproxy.settings import Settings
from tests.functional.test_workers import Proxy, engines, proxies, start_proxy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing is Linux's")

CAP = 2
REQUESTS = 32


async def test_caps_hold_across_four_workers_and_admission_waits_instead_of_refusing(
    proxies: list[Proxy], engines: list[Any], tmp_path: Path,  # noqa: F811
) -> None:
    prefill = await start_mock(MockConfig(role="prefill", ttft_ms=10))
    decode = await start_mock(MockConfig(role="decode", ttft_ms=2))
    engines.extend([prefill, decode])
    peaks: dict[str, list[int]] = {"prefill": [], "decode": []}

    def recorder(role: str) -> Any:
        def record(stats: Any) -> bool:  # called on every change of the engine's counters
            peaks[role].append(stats.in_flight)
            return False
        return record

    watches = [asyncio.ensure_future(engine[0].wait_until(recorder(role), timeout=30))
               for role, engine in (("prefill", prefill), ("decode", decode))]
    proxy = await start_proxy(proxies, tmp_path, prefill[2], decode[2], "--workers", "4",
                              "--prefill-max-in-flight", str(CAP), "--decode-max-in-flight", str(CAP),
                              "--queue-timeout", "20")
    url = await proxy.url()
    statuses: list[int] = []

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        async with http.post(url + "/v1/completions",
                             json={"model": "mock", "prompt": f"hello {i}", "max_tokens": 2}) as resp:
            body = await resp.read()
            statuses.append(resp.status)
            assert resp.status == 200, body  # the queue has room: a full cap waits, never refuses

    try:
        # one connection per request: the kernel spreads them over all four workers, all at the caps
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as http:
            await asyncio.wait_for(asyncio.gather(*(one(i, http) for i in range(REQUESTS))), 25)
    finally:
        for watch in watches:
            watch.cancel()
    # each cap reached, never passed, although each worker alone would allow CAP
    assert max(peaks["prefill"]) == CAP and max(peaks["decode"]) == CAP, peaks
    assert statuses == [200] * REQUESTS
    assert prefill[0].stats.prefills == REQUESTS


async def test_a_cap_another_worker_holds_is_waited_for_until_it_frees_or_the_queue_times_out(
    tmp_path: Path,
) -> None:
    """In one process: this app is worker 0 of a shared table; worker 1 is a row that holds the only slot."""
    prefill_engine, prefill_runner, prefill_url = await start_mock(MockConfig(role="prefill"))
    _, decode_runner, decode_url = await start_mock(MockConfig(role="decode"))
    table = SharedTable.create(2, columns=8, feed_slots=256, directory=str(tmp_path))
    other = WorkerRow(table, 1)
    held = other.cell(server_key("prefill", prefill_url))
    held.acquire()  # worker 1's lease: the cap of 1 is full for the whole host
    app = build_app(Settings(prefill_servers=prefill_url, decode_servers=decode_url, health_interval=0,
                             access_log=False, prefill_max_in_flight=1, queue_timeout=0.5))
    share_routing(app, table, 0)
    runner, url = await start_server(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "mock", "prompt": "hello", "max_tokens": 2}
            async with http.post(url + "/v1/completions", json=body) as resp:  # never freed: the queue's bound
                assert resp.status == 503
                assert "no slot within 0.5s" in (await resp.json())["error"]["message"]
            waiting = asyncio.ensure_future(http.post(url + "/v1/completions", json=body))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2
            while app.flow.admission.waiting != 1:  # queued in this worker: nothing here to await on
                assert loop.time() < deadline, "the request never queued"
                await asyncio.sleep(0.005)
            assert prefill_engine.stats.prefills == 0
            held.release()  # in worker 1: this worker learns of it from the table, not from a callback
            resp = await asyncio.wait_for(waiting, 2)
            assert resp.status == 200, await resp.text()
            resp.release()
        assert prefill_engine.stats.prefills == 1
    finally:
        await runner.cleanup()
        for engine_runner in (prefill_runner, decode_runner):
            await engine_runner.cleanup()
        del held, other
        table.close()
        table.unlink()
