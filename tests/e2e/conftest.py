"""Fixtures for the real-vLLM stage: the cluster that scripts/e2e-vllm.sh started, and helpers to read it.

The script writes a JSON description of the running servers and points E2E_VLLM_CLUSTER at it. Without
that variable the tests in this folder skip (the fast suite never starts a vLLM server).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

CLUSTER_ENV = "E2E_VLLM_CLUSTER"

_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Server:
    """One vLLM server: its URL, its process group (every process of it), and how to start it again."""

    name: str
    url: str
    pgid: int
    launcher: str  # a bash script that execs the server with the stage's exact command and environment
    log: str
    process: subprocess.Popen[bytes] | None = None  # set when a test restarted it

    def signal(self, signum: int) -> None:
        os.killpg(self.pgid, signum)


@dataclass(frozen=True)
class Cluster:
    model: str
    proxy: str
    proxy_prefix_hash: str
    proxy_responses_on_prefill: str  # --route-pools /v1/responses=prefill: the Responses API on both P servers
    pgid_file: str  # the script stops every process group listed here, whatever happens
    prefill: tuple[Server, ...]
    decode: tuple[Server, ...]

    @classmethod
    def load(cls, path: str) -> Cluster:
        raw: dict[str, Any] = json.loads(open(path).read())
        return cls(
            model=raw["model"],
            proxy=raw["proxy"],
            proxy_prefix_hash=raw["proxy_prefix_hash"],
            proxy_responses_on_prefill=raw["proxy_responses_on_prefill"],
            pgid_file=raw["pgid_file"],
            prefill=tuple(Server(**s) for s in raw["prefill"]),
            decode=tuple(Server(**s) for s in raw["decode"]),
        )

    def restart(self, server: Server) -> None:
        """Start a killed server again, same ports and flags, in a new process group that the
        script's exit trap stops too."""
        with open(server.log, "ab") as log:
            server.process = subprocess.Popen(["bash", server.launcher], stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True)
        with open(self.pgid_file, "a") as f:
            f.write(f"{server.process.pid}\n")
        server.pgid = server.process.pid


async def wait_healthy(http: aiohttp.ClientSession, server: Server, timeout: float = 600) -> float:
    """Wait until a (re)started vLLM server answers /health; return how long it took."""
    started = time.monotonic()
    while True:
        if server.process is not None and server.process.poll() is not None:
            raise AssertionError(f"{server.name} exited with {server.process.returncode}; see {server.log}")
        try:
            async with http.get(server.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{server.name} not healthy within {timeout:g}s; see {server.log}")
        await asyncio.sleep(1)


class Metrics:
    """One scrape of a Prometheus text page: sum of the samples that match a name and some labels."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match:
                labels = dict(_LABEL.findall(match["labels"] or ""))
                self.samples.append((match["name"], labels, float(match["value"])))

    def get(self, name: str, **labels: str) -> float:
        return sum(value for n, lab, value in self.samples
                   if n == name and all(lab.get(k) == v for k, v in labels.items()))


async def scrape(http: aiohttp.ClientSession, base_url: str) -> Metrics:
    async with http.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200, f"GET {base_url}/metrics answered {resp.status}"
        return Metrics(await resp.text())


@dataclass(frozen=True)
class KVSources:
    """D's prompt tokens by where their KV came from (vLLM's own counters)."""

    external_kv_transfer: float
    local_compute: float
    local_cache_hit: float

    def __sub__(self, other: KVSources) -> KVSources:
        return KVSources(self.external_kv_transfer - other.external_kv_transfer,
                         self.local_compute - other.local_compute,
                         self.local_cache_hit - other.local_cache_hit)


async def kv_sources(http: aiohttp.ClientSession, server: Server) -> KVSources:
    m = await scrape(http, server.url)
    name = "vllm:prompt_tokens_by_source_total"
    return KVSources(m.get(name, source="external_kv_transfer"), m.get(name, source="local_compute"),
                     m.get(name, source="local_cache_hit"))


async def kv_delta_when(http: aiohttp.ClientSession, server: Server, before: KVSources, prompt_tokens: int,
                        timeout: float = 15) -> KVSources:
    """D's KV-source counters since `before`, once they account for `prompt_tokens` prompt tokens
    (vLLM updates its counters from its output loop, possibly just after the answer went out)."""
    deadline = time.monotonic() + timeout
    while True:
        delta = await kv_sources(http, server) - before
        total = delta.external_kv_transfer + delta.local_compute + delta.local_cache_hit
        if total >= prompt_tokens or time.monotonic() > deadline:
            return delta
        await asyncio.sleep(0.2)


@pytest.fixture(scope="session")
def vllm_cluster() -> Cluster:
    path = os.environ.get(CLUSTER_ENV)
    if not path:
        pytest.skip(f"{CLUSTER_ENV} is not set: run scripts/e2e-vllm.sh")
    return Cluster.load(path)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session
