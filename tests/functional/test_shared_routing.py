"""`pdproxy serve --workers 4`: caps hold across the workers under load, and the prefix index is the host's."""

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


async def test_a_prefill_cap_holds_across_four_workers(
    proxies: list[Proxy], engines: list[Any], tmp_path: Path,  # noqa: F811
) -> None:
    prefill = await start_mock(MockConfig(role="prefill", ttft_ms=30))
    decode = await start_mock(MockConfig(role="decode"))
    engines.extend([prefill, decode])
    engine = prefill[0]
    peaks: list[int] = []

    def record(stats: Any) -> bool:  # called on every change of the engine's counters
        peaks.append(stats.in_flight)
        return False

    watch = asyncio.ensure_future(engine.wait_until(record, timeout=30))
    proxy = await start_proxy(proxies, tmp_path, prefill[2], decode[2], "--workers", "4",
                              "--prefill-max-in-flight", str(CAP), "--queue-timeout", "10")
    url = await proxy.url()
    statuses: list[int] = []
    retried: list[int] = []

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        async with http.post(url + "/v1/completions",
                             json={"model": "mock", "prompt": f"hello {i}", "max_tokens": 2}) as resp:
            await resp.read()
            statuses.append(resp.status)
            if resp.status == 503:  # another worker took the last slot between admission and prefill
                retried.append(i)

    try:
        # one connection per request: the kernel spreads them over all four workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as http:
            await asyncio.wait_for(asyncio.gather(*(one(i, http) for i in range(REQUESTS))), 20)
    finally:
        watch.cancel()
    assert max(peaks) == CAP, peaks  # reached, never passed, although each worker alone would allow CAP
    assert statuses.count(200) >= REQUESTS * 3 // 4 and set(statuses) <= {200, 503}, statuses
    assert engine.stats.prefills == statuses.count(200)
