"""Engine load from the engines themselves: vLLM's scheduler gauges, polled from each engine's /metrics.

Why: a proxy's own in-flight counts miss what other replicas (and clients going around the proxy)
send. So, when `--engine-metrics-interval` is set, each upstream's `vllm:num_requests_running`,
`vllm:num_requests_waiting` and KV-cache usage (`vllm:kv_cache_usage_perc`, or the older
`vllm:gpu_cache_usage_perc`) are read at that interval. The policies take the larger of their own
count and the engine's (the engine's reading lags, our own decisions of the last instant are not
in it yet), so several replicas do not all pile onto one engine. A reading older than `ttl` (3
polls) is ignored: an engine that stops answering falls back to our own counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pdproxy.routing.wiring import Background
from pdproxy.upstreams import Upstream

if TYPE_CHECKING:
    from pdproxy.app import App

log = logging.getLogger("pdproxy.engine_load")

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
MAX_METRICS_BYTES = 4 << 20  # an engine's exposition is tens of KiB; more is not an engine's /metrics


@dataclass(frozen=True, slots=True)
class EngineReading:
    running: float
    waiting: float
    kv_usage: float | None
    at: float

    @property
    def requests(self) -> float:
        return self.running + self.waiting


def parse_engine_metrics(text: str, at: float) -> EngineReading | None:
    """The gauges summed over the exposition's series (one per engine core); None without them."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (RUNNING, WAITING, *USAGE):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    if RUNNING not in values and WAITING not in values:
        return None
    usage = next((values[name] for name in USAGE if name in values), None)
    return EngineReading(values.get(RUNNING, 0.0), values.get(WAITING, 0.0), usage, at)


class EngineLoads:
    """The latest reading per upstream url, and the poller that keeps them fresh."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic,
                 timeout: float | None = None) -> None:
        if interval <= 0:
            raise ValueError("engine metrics interval must be > 0")
        self.interval = interval
        self.ttl = 3 * interval
        self._timeout = timeout or max(interval, 0.5)
        self._clock = clock
        self._readings: dict[str, EngineReading] = {}

    def reading(self, upstream: Upstream) -> EngineReading | None:
        """The upstream's fresh reading, None when there is none or it expired."""
        reading = self._readings.get(upstream.url)
        if reading is None or self._clock() - reading.at > self.ttl:
            return None
        return reading

    def requests(self, upstream: Upstream) -> float:
        """Running + waiting on the engine, 0 without a fresh reading."""
        reading = self.reading(upstream)
        return reading.requests if reading is not None else 0.0

    def record(self, url: str, reading: EngineReading | None) -> None:
        if reading is None:
            self._readings.pop(url, None)
        else:
            self._readings[url] = reading

    async def poll_once(self, session: aiohttp.ClientSession, upstreams: Iterable[Upstream]) -> None:
        await asyncio.gather(*(self._poll(session, u.url) for u in upstreams))

    async def _poll(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                if resp.status != 200:
                    return
                body = await resp.content.read(MAX_METRICS_BYTES)
            reading = parse_engine_metrics(body.decode(errors="replace"), self._clock())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("engine metrics of %s: %s", url, exc or type(exc).__name__)
            return  # the old reading expires on its own
        self.record(url, reading)

    async def run(self, members: Callable[[], Iterable[Upstream]], session: aiohttp.ClientSession) -> None:
        while True:
            await self.poll_once(session, list(members()))
            self._readings = {u: r for u, r in self._readings.items() if self._clock() - r.at <= self.ttl}
            await asyncio.sleep(self.interval)


def enable_engine_load(app: App, interval: float) -> EngineLoads | None:
    """Poll every upstream's /metrics each `interval` seconds and fold the readings into the policies."""
    if interval <= 0:
        return None
    flow = app.flow
    loads = EngineLoads(interval)
    for policy in (flow.prefill.policy, flow.decode_policy):
        while not hasattr(policy, "use_engine_load") and hasattr(policy, "inner"):
            policy = policy.inner
        if hasattr(policy, "use_engine_load"):
            policy.use_engine_load(loads)

    def members() -> list[Upstream]:
        return [*flow.prefill_pool.members, *flow.decode_pool.members]

    async def polling() -> None:
        async with aiohttp.ClientSession() as session:
            await loads.run(members, session)

    app.services.append(Background(polling))
    return loads
