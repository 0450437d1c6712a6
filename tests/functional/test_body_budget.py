"""Three ~90 MB request bodies at once against a pdproxy process whose body budget (200 MB) holds only two.

The design (http/server.py): the budget is taken from Content-Length before the body is read, so the body that
does not fit is answered 503 + Retry-After at once instead of being read into memory; the two that fit stream in
while /health stays responsive, the process RSS stays bounded, and every byte of budget comes back.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.functional.proxy_process import proxy_with_nofile

BUDGET = 200_000_000
BODY = 90_000_000
CHUNK = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def send_body(port: int, size: int) -> bytes:
    """POST a `size`-byte completion body (never valid JSON: the proxy reads and parses it, then answers 400)
    in 1 MiB writes with a pause each, so three bodies are in flight together for about a second; the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # read while sending: a refused body's 503 arrives (and the proxy closes) before our writes end, and a write
    # that then fails would discard what the reader had not yet taken
    answer = asyncio.create_task(read_answer(reader))
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Connection: close\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b'{"model": "mock", "prompt": "' + b"a" * (CHUNK - 29)
        sent = 0
        while sent < size and not answer.done():
            piece = chunk[: size - sent] if sent == 0 else b"a" * min(CHUNK, size - sent)
            try:
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), 20)
            except ConnectionError:
                break  # refused: the proxy answered and closed while we were still sending
            sent += len(piece)
            await asyncio.sleep(0.005)
        return await asyncio.wait_for(answer, 20)
    finally:
        answer.cancel()
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


async def hold_head(port: int, length: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def metric(http: aiohttp.ClientSession, url: str, prefix: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert lines, f"no {prefix} in /metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


@dataclass(slots=True)
class Run:
    latencies: list[float] = field(default_factory=list)  # each /health probe while the bodies were sent
    rss_growth: int = 0  # peak VmRSS of the proxy over its value before the bodies


async def three_bodies_at_once() -> Run:
    """The scenario of issue 15: the checks on the answers, the refusal and the budget's return are made here;
    the latencies and RSS are returned for the tests to judge."""
    run = Run()
    async with proxy_with_nofile(4096, "--body-budget-bytes", str(BUDGET)) as proxy:
        pid = proxy.process.pid
        port = int(proxy.url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as http:
            assert (await http.get(proxy.url + "/health")).status == 200
            rss_before = peak = rss_bytes(pid)
            bodies = [asyncio.create_task(send_body(port, BODY)) for _ in range(3)]
            loop = asyncio.get_running_loop()
            while not all(b.done() for b in bodies):
                started = loop.time()
                async with http.get(proxy.url + "/health") as resp:
                    assert resp.status == 200
                    await resp.read()
                run.latencies.append(loop.time() - started)
                peak = max(peak, rss_bytes(pid))
                await asyncio.sleep(0.02)  # probe pacing, not a wait for a condition
            run.rss_growth = peak - rss_before
            answers = [b.result() for b in bodies]
            assert sorted(a.split(b"\r\n", 1)[0] for a in answers) == [
                b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 503 Service Unavailable"]
            refused = next(a for a in answers if a.startswith(b"HTTP/1.1 503"))
            assert b"retry-after: 1" in refused.lower() and b"too many request bodies" in refused
            assert await metric(http, proxy.url, 'pdproxy_client_refusals_total{reason="body_budget"}') == 1
            assert await metric(http, proxy.url, "pdproxy_requests_in_flight") == 0

            # every byte of budget is back: heads promising exactly the budget are all accepted, one more is not
            held = [await hold_head(port, BUDGET // 2) for _ in range(2)]
            over = await hold_head(port, 1)
            reply = await asyncio.wait_for(over[0].read(), 5)
            assert reply.startswith(b"HTTP/1.1 503") and b"too many request bodies" in reply
            for reader, _ in held:
                with pytest.raises(asyncio.TimeoutError):  # still waiting for its body: accepted
                    await asyncio.wait_for(reader.read(1), 0.1)
            for _, writer in [*held, over]:
                writer.close()
        assert await proxy.stop() == 0
    assert b"Traceback" not in proxy.output
    print(f"health probes={len(run.latencies)} median={statistics.median(run.latencies) * 1000:.1f} ms "
          f"max={max(run.latencies) * 1000:.1f} ms rss_growth={run.rss_growth / 1e6:.0f} MB", file=sys.stderr)
    return run


async def test_three_large_bodies_over_the_budget() -> None:
    """Two bodies fit and are read (then 400: not JSON), the third is 503 + Retry-After at once, RSS stays under
    2x the budget, and /health keeps answering while the bodies stream in (median of the probes under 100 ms)."""
    run = await three_bodies_at_once()
    assert run.rss_growth < 2 * BUDGET, f"RSS grew by {run.rss_growth / 1e6:.0f} MB"
    assert len(run.latencies) >= 5, run.latencies
    assert statistics.median(run.latencies) < 0.1, run.latencies


async def test_no_health_probe_waits_100ms_while_large_bodies_are_parsed() -> None:
    run = await three_bodies_at_once()
    assert max(run.latencies) < 0.1, [round(x * 1000) for x in run.latencies]
