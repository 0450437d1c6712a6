"""pdproxy as a real process under a low RLIMIT_NOFILE, flooded with idle connections.

Issue 15 asked for 20,000 connections. The test process itself may hold at most 20,000 fds on this machine, so
the scenario is scaled: the proxy's limit is lowered to 4,096 fds (or 512) and the test opens 3,000 (or 800)
sockets. The behaviour under test is the same at any scale: --max-connections is fitted to the fd limit (two
per proxied stream), so a flood meets the cap and never EMFILE; excess connections are answered 503 at once;
the proxy's own upstream connects and health probes keep working (no healthy upstream is blamed for the flood),
the process neither dies nor spins nor logs a traceback, and every fd comes back.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

if sys.version_info >= (3, 11):
    from asyncio import timeout as time_limit
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as time_limit

from tests.functional.proxy_process import proxy_with_nofile


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` connected sockets that never send a byte."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        socks.append(sock)
    for start in range(0, count, 200):
        await asyncio.wait_for(asyncio.gather(
            *(loop.sock_connect(sock, ("127.0.0.1", port)) for sock in socks[start:start + 200])), 10)
    return socks


async def first_bytes(sock: socket.socket, timeout: float) -> bytes:
    """What the proxy sent before closing (b"" at a bare close), or b"<open>" if it still holds the socket."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with time_limit(timeout):
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk
    except (TimeoutError, asyncio.TimeoutError):
        return b"<open>" + data
    except ConnectionResetError:
        pass
    return data



async def settle(socks: list[socket.socket], held: int, timeout: float = 20.0) -> list[bytes]:
    """Each socket's first bytes once only `held` are still open and silent (the rest answered or closed), or
    `timeout` passed: on a loaded box the proxy may take seconds to accept and refuse a flood, so a socket still
    silent is read again until the count settles (polled: nothing tells the test when accept catches up)."""
    answers = [b"<open>"] * len(socks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        silent = [i for i, answer in enumerate(answers) if answer == b"<open>"]
        if len(silent) <= held or loop.time() > deadline:
            return answers
        for i, answer in zip(silent, await asyncio.gather(*(first_bytes(socks[i], 1.0) for i in silent)),
                             strict=True):
            answers[i] = answer if answer == b"<open>" else answer.removeprefix(b"<open>")


async def wait_for_fds(pid: int, target: int, timeout: float) -> int:
    """Poll /proc until the process holds at most `target` fds (the kernel tells us nothing when it closes one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (count := fd_count(pid)) > target and loop.time() < deadline:  # noqa: ASYNC110 - /proc has no event
        await asyncio.sleep(0.05)
    return count


async def completion(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.post(url + "/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 3}) as resp:
        return resp.status, (await resp.json())["choices"][0]["text"] if resp.status == 200 else ""


async def health(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/health") as resp:
        return resp.status


async def healthy_again(http: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    """/health is 503 while a health probe to P or D failed (timed out while the flood kept the proxy busy); the
    next good probe makes it 200 again. Polled: the proxy tells nobody when it recovers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await health(http, url) != 200:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.fixture(autouse=True)
def enough_fds_here() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8000), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4000:
        pytest.skip("the test process cannot open 3,000 sockets")


async def test_idle_flood_over_max_connections_is_refused_and_fds_come_back() -> None:
    """4,096 fds, --max-connections 1500, 3,000 idle sockets: 1,500 held, 1,500 answered 503 (at most 256 of
    them lingering, the rest closed at once); while the cap is full a new client is refused the same way (over
    the cap: 503 + Retry-After); the upstreams stay healthy throughout; once the idle ones leave, /health and a
    completion work at once and the fd count is back at its baseline."""
    async with proxy_with_nofile(4096, "--max-connections", "1500", "--health-interval", "0.5") as proxy:
        pid = proxy.process.pid
        port = int(proxy.url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as http:
            assert await health(http, proxy.url) == 200
        baseline = fd_count(pid)
        socks = await open_idle(port, 3000)
        try:
            # which 1,500 are held depends on the accept order, not on the connect order: count over all of them
            answers = await settle(socks, 1500)
            refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
            assert len(refused) == 1500 and answers.count(b"<open>") == 1500, {a[:40] for a in answers}
            assert all(b"retry-after: 1" in a.lower() for a in refused)
            held = next(sock for sock, answer in zip(socks, answers, strict=True) if answer == b"<open>")
            # + up to 4: health-probe and pooled upstream sockets come and go
            assert baseline + 1500 <= await wait_for_fds(pid, baseline + 1504, 5) <= baseline + 1504
            async with aiohttp.ClientSession() as http:  # the cap is full: the design refuses, it does not queue
                async with http.get(proxy.url + "/health") as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            # the held ones really are held: none was answered or closed
            assert await first_bytes(held, 0.2) == b"<open>"
        finally:
            for sock in socks:
                sock.close()
        assert await wait_for_fds(pid, baseline + 4, 5) <= baseline + 4
        async with aiohttp.ClientSession() as http:
            # a probe may time out while the proxy is busy with the flood on a loaded box; none met EMFILE (below)
            assert await healthy_again(http, proxy.url, 10)
            assert await completion(http, proxy.url) == (200, " tok0 tok1 tok2")
        assert await proxy.stop() == 0
    assert b"Traceback" not in proxy.output, proxy.output.decode(errors="replace")[-3000:]
    assert b"Too many open files" not in proxy.output, proxy.output.decode(errors="replace")[-3000:]


async def test_max_connections_is_fitted_to_the_fd_limit() -> None:
    """512 fds and the default --max-connections (10,000): the proxy lowers the cap to what 512 fds hold (64,
    one INFO line saying so), so 800 idle sockets meet the cap, never EMFILE: the excess gets 503, the proxy does
    not burn a core, its upstreams stay healthy, it serves at once when the flood leaves, and logs no traceback."""
    async with proxy_with_nofile(512, "--health-interval", "0.5") as proxy:
        pid = proxy.process.pid
        port = int(proxy.url.rsplit(":", 1)[1])
        baseline = fd_count(pid)
        socks = await open_idle(port, 800)  # the backlog (2,048) takes what accept has not reached yet
        try:
            answers = await settle(socks, 64)
            refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
            assert len(refused) == 800 - 64 and answers.count(b"<open>") == 64, {a[:40] for a in answers}
            assert fd_count(pid) < 512
            loop = asyncio.get_running_loop()
            before, started = cpu_seconds(pid), loop.time()
            await asyncio.sleep(1.0)  # measuring CPU over a fixed window: there is no event for "not spinning"
            used = (cpu_seconds(pid) - before) / (loop.time() - started)
            assert used < 0.5, f"proxy used {used:.0%} of a core under the flood"
            assert proxy.process.returncode is None
        finally:
            for sock in socks:
                sock.close()
        async with aiohttp.ClientSession() as http:
            assert await healthy_again(http, proxy.url, 10)
            assert await completion(http, proxy.url) == (200, " tok0 tok1 tok2")
        assert await wait_for_fds(pid, baseline + 4, 5) <= baseline + 4  # + pooled upstream/keep-alive sockets
        assert await proxy.stop() == 0
    assert b"max_connections 10000 lowered to 64" in proxy.output
    assert b"Traceback" not in proxy.output, proxy.output.decode(errors="replace")[-3000:]
    assert b"Too many open files" not in proxy.output, proxy.output.decode(errors="replace")[-3000:]
