"""`pdproxy serve --workers 4`: caps hold across the workers under load, and admission waits for a slot."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdproxy.mock import MockConfig, start_mock
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
