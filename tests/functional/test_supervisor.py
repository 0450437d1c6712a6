"""The `--workers` supervisor against real worker processes: restart backoff in a crash loop, the
per-worker scrape timeout with partial results (a SIGSTOPped worker), its own metrics, and a
non-UTF-8 Authorization on its admin port.

The workers are small stand-in processes speaking the supervisor's protocol (a `ready <control URL>`
line on stdout, /metrics on that URL; SIGTERM ends them), so a test starts a dozen of them in well
under a second. Each asks the test, over a loopback socket, what to do this time: the test scripts
each start and sees when it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdproxy.settings import Settings
from pdproxy.workers import RestartBackoff, Supervisor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP and SO_REUSEPORT as on Linux")

# One worker process: ask the test what to do ("serve", "crash", or "exit-after <s>" = serve, then exit 4).
STAND_IN = r"""
import asyncio, os, sys

async def main():
    reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    writer.write(b"%d\n" % os.getpid())
    mode = (await reader.readline()).decode().split()
    writer.close()
    if mode[0] == "crash":
        sys.exit(3)

    async def metrics(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b"# TYPE stand_in_pid gauge\nstand_in_pid %d\n" % os.getpid()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(metrics, "127.0.0.1", 0)
    print("ready http://127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    if mode[0] == "exit-after":
        await asyncio.sleep(float(mode[1]))
        sys.exit(4)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass
class Starts:
    """The test's side of the stand-ins: one scripted mode per start, and when each start asked."""

    modes: list[str]
    default: str = "serve"
    times: list[float] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid = int(await reader.readline())
        mode = self.modes.pop(0) if self.modes else self.default
        writer.write(mode.encode() + b"\n")
        await writer.drain()
        writer.close()
        async with self.arrived:
            self.times.append(asyncio.get_running_loop().time())
            self.pids.append(pid)
            self.arrived.notify_all()

    async def wait(self, n: int, timeout: float = 5) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.times) >= n), timeout)


def no_logging_setup() -> None:
    """The workers' logging set-up (it must pickle); the stand-ins log nothing."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Running:
    supervisor: Supervisor
    starts: Starts
    metrics_url: str
    admin_url: str | None


@contextlib.asynccontextmanager
async def supervisor(modes: list[str], *, workers: int, backoff: RestartBackoff | None = None,
                     scrape_timeout: float = 2.0, **settings: Any) -> AsyncIterator[Running]:
    """A Supervisor in this process (its real run(): listeners, starts, restarts, stop) over stand-ins."""
    starts = Starts(list(modes))
    server = await asyncio.start_server(starts.handle, "127.0.0.1", 0)
    announce = server.sockets[0].getsockname()[1]
    metrics_port = free_port()
    admin_port = settings.pop("admin_port", None)
    config = Settings(prefill_servers="10.0.0.1:8100", decode_servers="10.0.0.1:8200", host="127.0.0.1", port=0,
                      workers=workers, metrics_port=metrics_port, admin_port=admin_port, **settings)
    sup = Supervisor(config, no_logging_setup, command=(sys.executable, "-I", "-S", "-c", STAND_IN, str(announce)),
                     backoff=backoff, scrape_timeout=scrape_timeout)
    stop = asyncio.Event()
    task = asyncio.create_task(sup.run(until=stop.wait))
    try:
        started = asyncio.ensure_future(starts.wait(workers))
        await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED, timeout=5)
        if task.done():
            started.cancel()
            task.result()  # raises what stopped it
        await started
        yield Running(sup, starts, f"http://127.0.0.1:{metrics_port}/metrics",
                      f"http://127.0.0.1:{admin_port}" if admin_port else None)
    finally:
        for pid in starts.pids:  # a stopped one must be able to take its SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop.set()
        await asyncio.wait_for(task, 10)
        server.close()
        await server.wait_closed()


def samples(exposition: str, name: str) -> dict[str, float]:
    """`worker` label -> value of the samples of `name`."""
    return {s.labels["worker"]: s.value for family in text_string_to_metric_families(exposition)
            for s in family.samples if s.name == name}


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
        assert resp.status == 200
        return await resp.text()


async def wait_all_up(http: aiohttp.ClientSession, url: str, workers: int, timeout: float = 5) -> str:
    """Scrape until every worker answers (the supervisor reads each one's `ready` line a moment after it starts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = await scrape(http, url)
        if samples(text, "pdproxy_worker_up") == {str(i): 1.0 for i in range(workers)}:
            return text
        assert loop.time() < deadline, text
        await asyncio.sleep(0.02)


RESTARTING = re.compile(r"worker 0 \(pid \d+\) exited with code (\d) after [\d.]+s up: restarting in ([\d.]+)s")


async def test_a_crash_looping_worker_is_restarted_with_a_growing_delay_reset_once_it_stays_up(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # reset_after leaves a loaded machine plenty of time to see start 1 die "at once".
    backoff = RestartBackoff(base=0.02, cap=0.06, reset_after=0.4)
    # Start 1 serves and dies at once; 2 and 3 crash before they are ready; 4 stays up 0.5 s (> reset_after)
    # and dies; 5 serves for good.
    modes = ["exit-after 0", "crash", "crash", "exit-after 0.5"]
    with caplog.at_level(logging.INFO, logger="pdproxy.workers"):
        async with supervisor(modes, workers=1, backoff=backoff) as running:
            await running.starts.wait(5)
            text = await wait_all_up(http, running.metrics_url, 1)
    delays = [float(m[2]) for r in caplog.records if (m := RESTARTING.search(r.getMessage()))]
    codes = [m[1] for r in caplog.records if (m := RESTARTING.search(r.getMessage()))]
    assert codes == ["4", "3", "3", "4"]
    assert delays == [0.02, 0.04, 0.06, 0.02]  # doubling, capped (not 0.08), back to the base after staying up
    gaps = [later - earlier for earlier, later in itertools.pairwise(running.starts.times)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert gap >= delay  # each start really waited its delay
    assert gaps[3] >= 0.5 + 0.02  # start 4 stayed up for its 0.5 s first
    assert samples(text, "pdproxy_worker_restarts_total") == {"0": 4.0}
    assert samples(text, "stand_in_pid") == {"0": float(running.starts.pids[-1])}


async def test_a_stopped_worker_never_fails_the_scrape(http: aiohttp.ClientSession) -> None:
    async with supervisor([], workers=2, scrape_timeout=0.3) as running:
        text = await wait_all_up(http, running.metrics_url, 2)
        assert set(samples(text, "stand_in_pid")) == {"0", "1"}
        hung = running.starts.pids[1]  # one of the two: which worker index it is does not matter
        os.kill(hung, signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        began = loop.time()
        text = await scrape(http, running.metrics_url)
        took = loop.time() - began
        assert 0.3 <= took < 1.0, took  # the stopped one's timeout, not the whole scrape's
        up = samples(text, "pdproxy_worker_up")
        assert sorted(up.values()) == [0.0, 1.0]
        answering = next(worker for worker, value in up.items() if value == 1)
        assert samples(text, "stand_in_pid") == {answering: float(running.starts.pids[0])}  # the other's data only
        os.kill(hung, signal.SIGCONT)
        text = await wait_all_up(http, running.metrics_url, 2)
        assert set(samples(text, "stand_in_pid")) == {"0", "1"}
        assert samples(text, "pdproxy_worker_restarts_total") == {"0": 0.0, "1": 0.0}


async def test_a_non_utf8_authorization_on_the_supervisors_admin_port_is_a_401() -> None:
    async with supervisor([], workers=2, admin_port=free_port(), admin_token="s3cret") as running:
        assert running.admin_url is not None
        host, port = running.admin_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
        writer.write(b"GET /admin/upstreams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"Connection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"authentication_error" in answer


async def test_a_start_that_raises_never_ends_the_restarts(http: aiohttp.ClientSession,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    backoff = RestartBackoff(base=0.02, cap=0.05, reset_after=10)
    with caplog.at_level(logging.INFO, logger="pdproxy.workers"):
        async with supervisor(["exit-after 0.1"], workers=1, backoff=backoff) as running:
            sup = running.supervisor
            sup.setup_logging = lambda: None  # cannot be pickled: the next starts raise once their process began
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while samples(await scrape(http, running.metrics_url), "pdproxy_worker_restarts_total")["0"] < 3:
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            sup.setup_logging = no_logging_setup
            await running.starts.wait(2)  # the half-started ones were killed before they asked; this one serves
            await wait_all_up(http, running.metrics_url, 1)
    failed = [r.getMessage() for r in caplog.records if "did not start" in r.getMessage()]
    assert len(failed) >= 2 and all("pickle" in line for line in failed), failed  # (a 3rd start may pickle fine)
    killed = [r.getMessage() for r in caplog.records if "exited with code -9" in r.getMessage()]
    assert len(killed) >= 2  # each half-started process was killed, and its exit backed off as any other
