"""`pdproxy serve --workers 2` as a user runs it: a real supervisor and real worker processes sharing a
port, in front of in-process mock engines; merged metrics, admin fan-out, drain, restarts, no orphans."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from pdproxy.mock import MockConfig, MockEngine, start_mock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing is Linux's")

SRC = str(Path(__file__).resolve().parents[2] / "src")
LISTENING = re.compile(r"pdproxy listening on (http://127\.0\.0\.1:\d+)")
ADMIN = re.compile(r"admin API on (http://127\.0\.0\.1:\d+)/admin/upstreams")
READY = re.compile(r"worker (\d+) ready \(pid (\d+)\)")
CONNECTIONS = 40  # SO_REUSEPORT picks a worker per connection: 40 all on one of 2 has odds of 2**-39


class Proxy:
    """A `pdproxy --workers` process, its output read as it comes (so it never blocks on a full pipe)."""

    def __init__(self, process: asyncio.subprocess.Process, metrics_port: int) -> None:
        self.process = process
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._new_line.set()
        self._new_line.set()

    async def wait_line(self, pattern: re.Pattern[str], after: int = 0, timeout: float = 20) -> re.Match[str]:
        """The first output line from index `after` on that matches `pattern`."""
        async def search() -> re.Match[str]:
            seen = after
            while True:
                self._new_line.clear()
                for line in self.lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = max(seen, len(self.lines))
                assert not self._reader.done(), f"the proxy exited before printing {pattern.pattern!r}"
                await self._new_line.wait()

        return await asyncio.wait_for(search(), timeout)

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker, from the supervisor's `worker N ready (pid P)` lines."""
        return {int(m[1]): int(m[2]) for line in self.lines if (m := READY.search(line))}

    async def url(self) -> str:
        return (await self.wait_line(LISTENING))[1]

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(self.metrics_url) as resp:
            assert resp.status == 200
            return await resp.text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gone(pid: int) -> bool:
    """True once the process is gone or a zombie (its parent died; whoever inherits it may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def private_state_files(tmp_dir: Path) -> list[str]:
    """The supervisor's private state file(s), in its temporary directory under TMPDIR."""
    return [path.name for path in tmp_dir.glob("pdproxy-*/*")]


async def wait_gone(pids: list[int], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(gone(pid) for pid in pids):
        assert loop.time() < deadline, f"still running: {[pid for pid in pids if not gone(pid)]}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def proxies() -> AsyncIterator[list[Proxy]]:
    """Start supervisors; after the test, kill what is left (workers included) and wait for it."""
    started: list[Proxy] = []
    yield started
    for proxy in started:
        if proxy.process.returncode is None:
            proxy.process.kill()
            await proxy.process.wait()
        for pid in proxy.worker_pids().values():
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        await proxy._reader


@pytest.fixture
async def engines() -> AsyncIterator[list[tuple[MockEngine, web.AppRunner, str]]]:
    started: list[tuple[MockEngine, web.AppRunner, str]] = []
    yield started
    for _, runner, _ in started:
        await runner.cleanup()


async def start_engines(engines: list[Any], *roles: str) -> list[tuple[MockEngine, str]]:
    for role in roles:
        engines.append(await start_mock(MockConfig(role=role)))
    return [(engine, url) for engine, _, url in engines[-len(roles):]]


async def start_proxy(proxies: list[Proxy], tmp_path: Path, prefill: str, decode: str, *args: str) -> Proxy:
    metrics_port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TMPDIR": str(tmp_path)}  # the private state file's directory outlives a SIGKILLed supervisor
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdproxy", "--prefill-servers", prefill, "--decode-servers", decode,
        "--host", "127.0.0.1", "--port", "0", "--workers", "2", "--metrics-port", str(metrics_port),
        "--health-interval", "0", "--no-access-log", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    proxy = Proxy(process, metrics_port)
    proxies.append(proxy)
    return proxy


async def requests_on_new_connections(url: str, n: int = CONNECTIONS) -> None:
    """`n` requests, half streamed, each on its own connection, all at once; each must succeed."""
    async def one(i: int, http: aiohttp.ClientSession) -> None:
        stream = i % 2 == 0
        async with http.post(url + "/v1/completions", json={
                "model": "mock", "prompt": f"hello {i}", "max_tokens": 4, "stream": stream}) as resp:
            assert resp.status == 200, await resp.text()
            if stream:
                body = await resp.read()
                assert body.count(b"data: ") == 5 and body.endswith(b"data: [DONE]\n\n")
            else:
                assert (await resp.json())["choices"][0]["text"] == " tok0 tok1 tok2 tok3"

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as http:
        await asyncio.gather(*(one(i, http) for i in range(n)))


def requests_per_worker(exposition: str) -> dict[str, float]:
    served: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "pdproxy_requests_total":
                served[sample.labels["worker"]] = served.get(sample.labels["worker"], 0) + sample.value
    return served


async def test_workers_share_the_port_and_merge_their_metrics(
    proxies: list[Proxy], engines: list[Any], tmp_path: Path,
) -> None:
    (_, prefill), (decode, decode_url) = await start_engines(engines, "prefill", "decode")
    proxy = await start_proxy(proxies, tmp_path, prefill, decode_url)
    url = await proxy.url()
    assert sorted(proxy.worker_pids()) == [0, 1]

    await requests_on_new_connections(url)
    assert len(decode.requests) == CONNECTIONS

    async with aiohttp.ClientSession() as http:
        exposition = await proxy.metrics(http)
        for path, status in (("/health", 200), ("/v1/models", 200), ("/metrics", 404), ("/admin/upstreams", 404)):
            async with http.get(url + path) as resp:
                assert resp.status == status, path  # the main port: OpenAI routes and /health only
    names = [family.name for family in text_string_to_metric_families(exposition)]
    assert len(names) == len(set(names)) and "pdproxy_request_duration_seconds" in names
    headers = [line for line in exposition.splitlines() if line.startswith("#")]
    assert len(headers) == len(set(headers))
    served = requests_per_worker(exposition)
    assert set(served) == {"0", "1"} and all(served.values()), served  # both workers served some
    assert sum(served.values()) == CONNECTIONS

    assert private_state_files(tmp_path) == ["upstreams.json"]
    proxy.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proxy.process.wait(), 15) == 0
    await wait_gone(list(proxy.worker_pids().values()))
    assert private_state_files(tmp_path) == []  # removed at exit


async def test_admin_reaches_every_worker_and_a_restarted_one_starts_from_the_current_membership(
    proxies: list[Proxy], engines: list[Any], tmp_path: Path,
) -> None:
    (_, prefill), (old, old_url), (new, new_url) = await start_engines(engines, "prefill", "decode", "decode")
    proxy = await start_proxy(proxies, tmp_path, prefill, old_url, "--admin-port", "0")
    url = await proxy.url()
    admin = (await proxy.wait_line(ADMIN))[1] + "/admin/upstreams"

    async with aiohttp.ClientSession() as http:
        async with http.post(admin, json={"role": "decode", "url": new_url}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.delete(admin, params={"role": "decode", "url": old_url}) as resp:
            assert resp.status == 200 and (await resp.json())["removed"], await resp.text()
        await requests_on_new_connections(url)  # every worker must route to the new D: the old one is gone
        assert len(new.requests) == CONNECTIONS and not old.requests

        # A killed worker is restarted; it starts from the state file (new D), not from the flags (old D).
        killed = proxy.worker_pids()[1]
        mark = len(proxy.lines)
        os.kill(killed, signal.SIGKILL)
        restarted = int((await proxy.wait_line(re.compile(r"worker 1 ready \(pid (\d+)\)"), after=mark))[1])
        assert restarted != killed and gone(killed)

        # Its upstream ids differ from worker 0's (numbered afresh): the supervisor translates them.
        async with http.get(admin) as resp:
            listed = {u["url"]: u for u in (await resp.json())["upstreams"]}
        assert set(listed) == {prefill, new_url}
        async with http.patch(f"{admin}/{listed[new_url]['id']}", json={"weight": 3}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(admin) as resp:
            assert {u["url"]: u["weight"] for u in (await resp.json())["upstreams"]} == {prefill: 1, new_url: 3}

        await requests_on_new_connections(url)
        assert len(new.requests) == 2 * CONNECTIONS and not old.requests
        assert requests_per_worker(await proxy.metrics(http))["1"] > 0  # the restarted worker serves

    # No orphans: with the supervisor killed, its workers see their stdin close and exit.
    proxy.process.kill()
    await proxy.process.wait()
    await wait_gone(list(proxy.worker_pids().values()))


async def test_more_than_one_worker_needs_a_metrics_port() -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdproxy", "--prefill-servers", "p:1", "--decode-servers", "d:1", "--workers", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert output.decode().splitlines() == [
        "pdproxy: invalid settings: settings: workers > 1 needs metrics_port (--metrics-port): the supervisor "
        "serves the workers' merged /metrics there"]


async def test_sigterm_drains_a_stream_in_flight_then_exits_0(
    proxies: list[Proxy], engines: list[Any], tmp_path: Path,
) -> None:
    (_, prefill), (decode, decode_url) = await start_engines(engines, "prefill", "decode")
    proxy = await start_proxy(proxies, tmp_path, prefill, decode_url, "--drain-timeout", "20")
    url = await proxy.url()
    async with aiohttp.ClientSession() as http:
        async def stream() -> bytes:
            async with http.post(url + "/v1/completions", json={
                    "model": "mock", "prompt": "hi", "max_tokens": 40, "stream": True}) as resp:
                assert resp.status == 200
                return await resp.read()

        decode.hold()  # the stream stays open until the drain has begun
        streaming = asyncio.ensure_future(stream())
        await decode.wait_until(lambda stats: stats.in_flight == 1)
        proxy.process.send_signal(signal.SIGTERM)
        draining = await proxy.wait_line(re.compile(r"\[worker [01]\]: draining: 1 requests in flight"))
        assert draining.string.count("[worker ") == 1  # the worker with the stream says so, once
        assert proxy.process.returncode is None
        decode.release()
        body = await asyncio.wait_for(streaming, 10)
    assert body.count(b"data: ") == 41 and body.endswith(b"data: [DONE]\n\n")
    assert await asyncio.wait_for(proxy.process.wait(), 15) == 0
    await asyncio.wait_for(proxy._reader, 5)  # all output read
    for index in (0, 1):
        assert any(f"pdproxy.workers[worker {index}]: worker {index} stopped" in line for line in proxy.lines)
    assert decode.stats.completed == 1 and decode.stats.aborted == 0
    await wait_gone(list(proxy.worker_pids().values()))
