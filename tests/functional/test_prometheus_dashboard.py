"""Every query of the Grafana dashboard, evaluated by a real Prometheus scraping a real pdproxy under load.

Prometheus (Debian's package; .ci/run installs it) runs on a loopback port with a 1 s scrape interval and
scrapes the proxy of a test cluster (mock engines on loopback). The test sends a little traffic and
provokes, once each, the events some panels exist for (a prefill 500 that is retried and ejects its P, a
client gone mid-stream, a prefill timeout, a full queue, an admin change, a bad discovery file and a
discovered upstream), then asks Prometheus every panel query and every query variable of
config/grafana/pdproxy-dashboard.json. Each must return at least one series with a finite value.

Grafana's variables are substituted as Grafana would with "All" selected (`$instance`, `$job` -> `.*`);
`$__rate_interval` becomes 20s (Grafana's minimum with a 1 s scrape interval is 4 s; 20 s keeps the
provoked events in every window while the queries are asked). Prometheus takes about 5 s to first scrape
a new target (its discovery manager sends target updates every 5 s), which is most of this test's time.

Set DASHBOARD_QUERY_REPORT=path to get each query and what it returned as JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdproxy.mock import MockConfig
from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory, closed_port_url
from tests.functional.test_metrics import (
    COMPLETIONS,
    PLAIN,
    STREAM,
    STREAM_WITH_USAGE,
    admin,
    dashboard,
    dashboard_panels,
)
from tests.functional.test_metrics import until_sample as until_counted

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed "
                                "(apt-get install prometheus; .ci/run installs it)")
RATE_INTERVAL = "20s"
# Gauges of the moment: one request at a time runs here, so a scrape between two requests reads 0.
MAY_BE_ZERO = {"Requests in flight [A]", "Requests in flight and queue [A]", "In flight per upstream [A]"}
# Panels whose every value is rightly 0 here, and why; every other query must show a value above 0.
ZERO_HERE = {
    "Requests in flight and queue [B]": "queue_size=0 in this test: a request never waits, it is refused (Queue [B])",
    "Queue [A]": "the same gauge: nothing waits with queue_size=0",
    "Retries [B]": "no decode fails before its first byte here (flow retries)",
    "Retries [C]": ("no prefill outlasts its hedge delay here (the 1 s floor is past the 0.5 s prefill timeout); "
                    "tests/functional/test_hedging.py provokes every result"),
    "KV handoff missing [A]": "the mock engines always answer with kv_transfer_params",
    "PD skipped by reason [A]": ("--pd-min-prompt-tokens is off here (tests/functional/test_skip_pd.py counts "
                                 "skips)"),
    "Pool panic [A]": ("panic needs under half of a pool healthy; here one of two prefill servers is ejected "
                       "(tests/functional/test_panic.py provokes it)"),
}
SCRAPE_DEADLINE = 15.0  # seconds for Prometheus to start and scrape the proxy a first time
ANSWER_DEADLINE = 10.0  # seconds for every query to have data after the events


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grafana_to_promql(expr: str) -> str:
    """The query as Grafana sends it with every variable at "All"."""
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace('"$instance"', '".*"')
            .replace('"$job"', '".*"'))


def dashboard_query_list() -> list[tuple[str, str]]:
    """(where, query) for every panel target and query variable."""
    queries = [(f"{panel['title']} [{target['refId']}]", target["expr"])
               for panel in dashboard_panels() for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((f"variable ${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return queries


class Prometheus:
    """A real Prometheus process and its HTTP API."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "pdproxy", "static_configs": [{"targets": [target]}]}],
        }), encoding="utf-8")
        assert PROMETHEUS is not None
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()

    async def query(self, http: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        async with http.get(self.url + "/api/v1/query", params={"query": promql},
                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.json()
        assert body["status"] == "success", f"{promql}: {body}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def label_values(self, http: aiohttp.ClientSession, selector: str, label: str) -> list[str]:
        async with http.get(self.url + f"/api/v1/label/{label}/values", params={"match[]": selector},
                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return list(body["data"])


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        server = Prometheus(tmp_path, target)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def answer(prometheus: Prometheus, http: aiohttp.ClientSession, query: str) -> list[dict[str, Any]]:
    """What the dashboard shows for one query: a PromQL result, or the values of a label_values() variable."""
    variable = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    if variable:
        selector, label = variable.groups()
        values = await prometheus.label_values(http, grafana_to_promql(selector), label)
        return [{"metric": {label: value}, "value": [0, "1"]} for value in values]
    return await prometheus.query(http, grafana_to_promql(query))


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


async def until(check: Any, deadline: float, what: str) -> None:
    """Re-check (every 100 ms, bounded) a condition only Prometheus can answer; no event announces it."""
    end = asyncio.get_running_loop().time() + deadline
    while not await check():
        assert asyncio.get_running_loop().time() < end, what
        await asyncio.sleep(0.1)


async def provoke_queue_full_and_timeout(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """A client's mistake (400); a prefill past its timeout holds the only slot (504) while the queue is
    full (503)."""
    async with http.post(cluster.url + COMPLETIONS, json={"model": "mock", "prompt": 7}) as resp:
        assert resp.status == 400
    second = cluster.prefill[1]
    second.hang_next()
    seen = len(second.requests)
    hanging = asyncio.ensure_future(http.post(cluster.url + COMPLETIONS, json=PLAIN))
    await second.wait_for_requests(seen + 1)
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN) as resp:
        assert resp.status == 503
    async with await hanging as resp:
        assert resp.status == 504


async def provoke_every_event(cluster: Cluster, http: aiohttp.ClientSession, upstreams: Path) -> None:
    """The events some panels exist for, once each (the same sequence as the dashboard liveness test)."""
    first = cluster.prefill[0]
    first.fail_next(500)  # retried on the other P; the failing P is ejected (eject_after=1)
    for _ in range(2):  # round robin: the first or the second request reaches it
        async with http.post(cluster.url + COMPLETIONS, json=STREAM_WITH_USAGE) as resp:
            assert resp.status == 200
            await resp.read()
        if cluster.upstream(cluster.prefill_urls[0]).state is State.EJECTED:
            break
    await cluster.wait_state(cluster.prefill_urls[0], State.EJECTED)
    long_prompt = PLAIN | {"prompt": " ".join(f"w{i}" for i in range(40))}
    for _ in range(2):  # the one routable P finds the repeat in its prefix cache (cached prompt tokens)
        async with http.post(cluster.url + COMPLETIONS, json=long_prompt) as resp:
            assert resp.status == 200
    async with aiohttp.ClientSession() as session:  # a client gone mid-stream
        resp = await session.post(cluster.url + COMPLETIONS, json=STREAM | {"max_tokens": 500})
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
        await cluster.decode[0].wait_until(lambda stats: stats.aborted == 1)
    await cluster.flow.wait_idle()
    # A request the server refuses itself: more headers than --max-headers.
    async with http.get(cluster.url + "/health", headers={f"x-extra-{i}": "1" for i in range(200)}) as resp:
        assert resp.status == 431
    await provoke_queue_full_and_timeout(cluster, http)
    # A batch of 2 prompts (Fan-out): one slot and no queue cannot hold its 2 flows, so it is refused whole; it
    # is counted on arrival all the same.
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN | {"prompt": ["a", "b"]}) as resp:
        assert resp.status == 503
    status, _ = await admin(http, cluster, "PATCH", json={"weight": 2},
                            path=f"/{cluster.upstream(cluster.prefill_urls[1]).id}")
    assert status == 200
    # Discovery: a bad file (an error), then a good one that adds an upstream.
    replace(upstreams, "decode: [not yaml\n")
    await until_counted(cluster, "pdproxy_discovery_errors_total", source="file")
    replace(upstreams, f"decode: [{closed_port_url()}]\n")
    await until_counted(cluster, "pdproxy_discovery_changes_total", source="file", action="add")


def replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


async def steady_load(cluster: Cluster, http: aiohttp.ClientSession, stop: asyncio.Event) -> int:
    """One request at a time (the proxy has a single slot here), streams and plain, until stopped."""
    sent = 0
    while not stop.is_set():
        body = STREAM_WITH_USAGE if sent % 3 else PLAIN
        async with http.post(cluster.url + COMPLETIONS, json=body) as resp:
            await resp.read()
        sent += 1
    return sent


@pytest.fixture
async def http_client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_every_dashboard_query_returns_data(cluster_factory: ClusterFactory, prometheus_factory: Any,
                                                  http_client: aiohttp.ClientSession, tmp_path: Path) -> None:
    http = http_client
    upstreams = tmp_path / "upstreams.yaml"
    upstreams.write_text("decode: []\n", encoding="utf-8")
    cluster = await cluster_factory(
        prefill_policy="round_robin", eject_after=1, prefill_timeout=0.5, max_concurrency=1, queue_size=0,
        decode_config=MockConfig(role="decode", itl_ms=2), prefill_config=MockConfig(role="prefill"),
        discovery="file", discovery_file=upstreams, discovery_interval=0.05,
    )
    prometheus = prometheus_factory(cluster.url.removeprefix("http://"))
    stop = asyncio.Event()
    load = asyncio.ensure_future(steady_load(cluster, http, stop))
    try:
        async def scraped() -> bool:
            try:
                return has_data(await prometheus.query(http, 'up{job="pdproxy"} == 1'))
            except aiohttp.ClientError:
                return False  # not listening yet

        await until(scraped, SCRAPE_DEADLINE, "Prometheus never scraped the proxy")
        stop.set()
        await load

        async def resume_load_until_scraped() -> None:
            """Load again, and wait for two scrapes (1 s apart) after what just happened."""
            nonlocal load
            events_done = time.time()
            stop.clear()
            load = asyncio.ensure_future(steady_load(cluster, http, stop))

            async def scraped_since() -> bool:
                result = await prometheus.query(http, 'timestamp(up{job="pdproxy"})')
                return bool(result) and float(result[0]["value"][1]) > events_done + 1.5

            await until(scraped_since, SCRAPE_DEADLINE, "Prometheus stopped scraping the proxy")
        await provoke_every_event(cluster, http, upstreams)
        await resume_load_until_scraped()
        # requests_total{status="503"} and {status="504"} were born by those events: Prometheus sees a
        # series' first step only from its second sample on, so the 5xx panels need them once more.
        stop.set()
        await load
        await provoke_queue_full_and_timeout(cluster, http)
        await resume_load_until_scraped()

        queries = dashboard_query_list()
        results: dict[str, list[dict[str, Any]]] = {}

        async def all_answered() -> bool:
            for where, query in queries:
                if where not in results or not has_data(results[where]):
                    results[where] = await answer(prometheus, http, query)
            return all(has_data(result) for result in results.values())

        try:
            await until(all_answered, ANSWER_DEADLINE, "some dashboard queries returned no data")
        finally:
            report = [{"panel": where, "query": query, "series": len(results.get(where, [])),
                       "values": sorted({round(float(s["value"][1]), 6) for s in results.get(where, [])
                                         if math.isfinite(float(s["value"][1]))})[:6],
                       "labels": [s["metric"] for s in results.get(where, [])][:4]}
                      for where, query in queries]
            if os.environ.get("DASHBOARD_QUERY_REPORT"):
                with open(os.environ["DASHBOARD_QUERY_REPORT"], "w", encoding="utf-8") as file:  # noqa: ASYNC230
                    json.dump(report, file, indent=1)
            empty = [row["panel"] for row in report if not row["values"]]
            assert not empty, f"no data for: {empty}"
            flat = [row["panel"] for row in report
                    if max(row["values"]) <= 0 and row["panel"] not in ZERO_HERE and row["panel"] not in MAY_BE_ZERO]
            assert not flat, f"only zeros (the event did not show) for: {flat}"
            stale = [row["panel"] for row in report if row["panel"] in ZERO_HERE and max(row["values"]) > 0]
            assert not stale, f"ZERO_HERE is out of date: these show values now: {stale}"
    finally:
        stop.set()
        await load
    assert len(queries) >= 50  # every panel target and variable was asked
