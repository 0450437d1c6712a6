"""Every query of the Grafana dashboard, evaluated by a real Prometheus scraping a real pdproxy under load.

Prometheus (Debian's package; .ci/run installs it) runs on a loopback port with a 1 s scrape interval and
scrapes the proxy of a test cluster (mock engines on loopback). The test sends a little traffic and
provokes, once each, the event every panel exists for (a prefill 500 that is retried and ejects its P, so
the prefill pool panics; a prefix-cache hit; a decode 503 before its first byte, so the whole flow runs
again; a prefill answer without kv_transfer_params; a prompt too short for PD; a client gone mid-stream;
a request the server refuses itself; a request waiting in the queue and one refused as the queue is full;
a prefill past its timeout on both P, the second being its hedge; an admin change; a bad discovery file
and a discovered upstream), then asks Prometheus every panel query and every query variable of
config/grafana/pdproxy-dashboard.json. Each must return at least one series with a finite value above 0.
The gauges of a moment (in flight, queued) are asked while the request is held in flight and one waits
in the queue; at the end they must still answer, and may read 0.

Grafana's variables are substituted as Grafana would with "All" selected (`$instance`, `$job` -> `.*`);
`$__rate_interval` becomes 20s (Grafana's minimum with a 1 s scrape interval is 4 s; 20 s keeps the
provoked events in every window while the queries are asked). Prometheus takes about 5 s to first scrape
a new target (its discovery manager sends target updates every 5 s), which is most of this test's time.

Set PDPROXY_DASHBOARD_REPORT=path to get each query and what it returned: a Markdown table (a path ending
in .json: JSON), e.g. `PDPROXY_DASHBOARD_REPORT=/tmp/dash.md pytest tests/functional/test_prometheus_dashboard.py`.
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
from tests.conftest import Cluster, ClusterFactory, closed_port_url, needs_tool
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
pytestmark = needs_tool(PROMETHEUS, "prometheus: apt-get install prometheus; .ci/run installs it")
RATE_INTERVAL = "20s"
# Gauges of a moment: asked while one request is held in flight and one waits in the queue (at the end,
# with nothing in flight, they rightly read 0).
MOMENT = ("Requests in flight [A]", "Requests in flight and queue [A]", "Requests in flight and queue [B]",
          "In flight per upstream [A]", "Queue [A]")
# Panels whose every value is rightly 0 here, and why; every other query must show a value above 0. Every
# event a panel exists for is provoked below, so none is left.
ZERO_HERE: dict[str, str] = {}
# A prefill answer without kv_transfer_params (an engine without a KV connector): D computes the prompt itself.
NO_HANDLE = (b'{"id": "cmpl-no-handle", "object": "text_completion", "created": 0, "model": "mock", '
             b'"choices": [{"index": 0, "text": " tok0", "logprobs": null, "finish_reason": "length", '
             b'"stop_reason": null}], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}')
# Read at import: the tests' clean_env fixture removes every PDPROXY_* variable before a test runs.
REPORT = os.environ.get("PDPROXY_DASHBOARD_REPORT")
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
        assert PROMETHEUS is not None, "prometheus is not installed (.ci/run installs it)"
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


def positive(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(value := float(series["value"][1])) and value > 0 for series in result)


async def until(check: Any, deadline: float, what: str) -> None:
    """Re-check (every 100 ms, bounded) a condition only Prometheus can answer; no event announces it."""
    end = asyncio.get_running_loop().time() + deadline
    while not await check():
        assert asyncio.get_running_loop().time() < end, what
        await asyncio.sleep(0.1)


async def any_decode(cluster: Cluster, predicate: Any) -> None:
    """Until one decode server's stats meet `predicate` (which one got the request is the policy's choice)."""
    waits = [asyncio.ensure_future(engine.wait_until(predicate)) for engine in cluster.decode]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        assert any(not task.exception() for task in done), "no decode server met the condition"
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def until_proxy(check: Any, what: str) -> None:
    """Until the proxy's own state shows `check()` (bounded); a queued request announces no event."""
    end = asyncio.get_running_loop().time() + 3
    while not check():
        assert asyncio.get_running_loop().time() < end, what
        await asyncio.sleep(0.01)


async def provoke_queue_and_timeout(cluster: Cluster, http: aiohttp.ClientSession,
                                    prometheus: Prometheus | None = None) -> dict[str, list[dict[str, Any]]]:
    """A client's mistake (400); a stream held by D after its first token takes the only slot while one
    request waits in the queue (queue_size=1) and the next is refused (503); a prefill past its timeout
    on one P and on its hedge on the other (504). With `prometheus`, the gauges of the moment are asked
    while the slot is held and the queue is full: their answers are returned."""
    async with http.post(cluster.url + COMPLETIONS, json={"model": "mock", "prompt": 7}) as resp:
        assert resp.status == 400
    moment: dict[str, list[dict[str, Any]]] = {}
    for engine in cluster.decode:
        engine.hold()
    held = await http.post(cluster.url + COMPLETIONS, json=STREAM)
    waiting: asyncio.Future[aiohttp.ClientResponse] | None = None
    try:
        assert held.status == 200 and (await held.content.readany()).startswith(b"data: ")
        waiting = asyncio.ensure_future(http.post(cluster.url + COMPLETIONS, json=PLAIN))
        await until_proxy(lambda: cluster.metric("pdproxy_queue_waiting") == 1, "the request never queued")
        async with http.post(cluster.url + COMPLETIONS, json=PLAIN) as resp:
            assert resp.status == 503
        if prometheus is not None:
            queries = dict(dashboard_query_list())

            async def seen() -> bool:
                for where in MOMENT:
                    if not positive(moment.get(where, [])):
                        moment[where] = await answer(prometheus, http, queries[where])
                return all(positive(moment[where]) for where in MOMENT)

            await until(seen, SCRAPE_DEADLINE, "Prometheus never saw the held request and the queued one")
    finally:
        for engine in cluster.decode:
            engine.release()
        await held.read()
        held.release()
        if waiting is not None:
            async with await waiting as resp:
                assert resp.status == 200
    hedged = cluster.metric("pdproxy_prefill_hedges_total", result="failed") + cluster.metric(
        "pdproxy_prefill_hedges_total", result="lost")
    for engine in cluster.prefill:
        engine.hang_next()  # the first attempt's P, then its hedge's (after prefill_hedge_floor)
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN) as resp:
        assert resp.status == 504
    assert all(engine.requests for engine in cluster.prefill)
    assert cluster.metric("pdproxy_prefill_hedges_total", result="failed") + cluster.metric(
        "pdproxy_prefill_hedges_total", result="lost") > hedged, "the hung prefill was not hedged"
    return moment


async def until_one_of(send: Any, counted: Any, times: int, what: str) -> None:
    """Send until `counted()` (a scripted fault sits on one server of two; round robin reaches it)."""
    for _ in range(times):
        await send()
        if counted():
            return
    raise AssertionError(what)


async def provoke_every_event(cluster: Cluster, http: aiohttp.ClientSession, upstreams: Path,
                              prometheus: Prometheus) -> dict[str, list[dict[str, Any]]]:
    """The events some panels exist for, once each. Returns the gauges of the moment Prometheus saw."""

    async def post(body: dict[str, Any], status: int = 200) -> None:
        async with http.post(cluster.url + COMPLETIONS, json=body) as resp:
            assert resp.status == status, await resp.text()
            await resp.read()

    first = cluster.prefill[0]
    first.fail_next(500)  # retried on the other P; the failing P is ejected (eject_after=1)
    await until_one_of(lambda: post(STREAM_WITH_USAGE),
                       lambda: cluster.upstream(cluster.prefill_urls[0]).state is State.EJECTED, 2,
                       "the failing P was never ejected")
    # One P of two healthy is under --healthy-panic-threshold 0.6: the prefill pool panics (both route).
    assert cluster.metric("pdproxy_pool_panic", role="prefill") == 1
    long_prompt = PLAIN | {"prompt": " ".join(f"w{i}" for i in range(40))}
    # Round robin over both P: the third send at the latest meets its repeat in one P's prefix cache.
    await until_one_of(lambda: post(long_prompt), lambda: cluster.metric("pdproxy_prefill_cached_prompt_tokens_total"),
                       3, "no prefix-cache hit")
    cluster.decode[1].fail_next(503)  # before its first byte: the whole flow runs again on the other D
    await until_one_of(lambda: post(PLAIN), lambda: cluster.metric("pdproxy_flow_retries_total"), 3,
                       "the decode failure was not retried")
    cluster.prefill[1].fail_next(200, body=NO_HANDLE)  # no handle: D prefills itself
    await until_one_of(lambda: post(PLAIN), lambda: cluster.metric("pdproxy_kv_handoff_missing_total"), 3,
                       "the prefill answer without a handle was not counted")
    await post({"model": "mock", "prompt": "x", "max_tokens": 3})  # under --pd-min-prompt-tokens: D alone
    assert cluster.metric("pdproxy_pd_skipped_total", reason="short_prompt") == 1
    # A batch of 2 prompts (Fan-out): 2 PD flows, the second waiting for the one slot (queue_size=1).
    await post(PLAIN | {"prompt": ["tell me about rooms", "and about their doors"]})
    assert cluster.metric("pdproxy_fanout_flows_total") == 2
    async with aiohttp.ClientSession() as session:  # a client gone mid-stream
        resp = await session.post(cluster.url + COMPLETIONS, json=STREAM | {"max_tokens": 500})
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
        await any_decode(cluster, lambda stats: stats.aborted == 1)
    await cluster.flow.wait_idle()
    # A request the server refuses itself: more headers than --max-headers.
    async with http.get(cluster.url + "/health", headers={f"x-extra-{i}": "1" for i in range(200)}) as resp:
        assert resp.status == 431
    moment = await provoke_queue_and_timeout(cluster, http, prometheus)
    status, _ = await admin(http, cluster, "PATCH", json={"weight": 2},
                            path=f"/{cluster.upstream(cluster.prefill_urls[1]).id}")
    assert status == 200
    # Discovery: a bad file (an error), then a good one that adds an upstream.
    replace(upstreams, "decode: [not yaml\n")
    await until_counted(cluster, "pdproxy_discovery_errors_total", source="file")
    replace(upstreams, f"decode: [{closed_port_url()}]\n")
    await until_counted(cluster, "pdproxy_discovery_changes_total", source="file", action="add")
    return moment


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
    # Two P and two D (round robin: a fault scripted on one server of two is met within two requests), one
    # slot and a one-place queue; a hedge may start 0.2 s into a prefill (before its 0.5 s timeout); a pool
    # with under 60% of its members healthy panics; prompts under 4 characters (one per token) skip PD.
    cluster = await cluster_factory(
        2, 2, prefill_policy="round_robin", decode_policy="round_robin", eject_after=1, prefill_timeout=0.5,
        max_concurrency=1, queue_size=1, prefill_hedge_floor=0.2, healthy_panic_threshold=0.6,
        pd_min_prompt_tokens=4, chars_per_token=1.0,
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
        moment = await provoke_every_event(cluster, http, upstreams, prometheus)
        await resume_load_until_scraped()
        # requests_total{status="503"} and {status="504"} were born by those events: Prometheus sees a
        # series' first step only from its second sample on, so the 5xx panels need them once more.
        stop.set()
        await load
        await provoke_queue_and_timeout(cluster, http)
        await resume_load_until_scraped()

        queries = dashboard_query_list()
        results: dict[str, list[dict[str, Any]]] = {}

        def expected(where: str, result: list[dict[str, Any]]) -> bool:
            return has_data(result) if where in MOMENT or where in ZERO_HERE else positive(result)

        async def all_answered() -> bool:
            for where, query in queries:
                if not expected(where, results.get(where, [])):
                    results[where] = await answer(prometheus, http, query)
            return all(expected(where, results[where]) for where, _ in queries)

        try:
            await until(all_answered, ANSWER_DEADLINE, "some dashboard queries returned no data, or only zeros")
        finally:
            report = [row(where, query, results.get(where, []), "end") for where, query in queries]
            report += [row(where, dict(queries)[where], moment.get(where, []), "held") for where in MOMENT]
            if REPORT:
                write_report(Path(REPORT), report)
            empty = [r["panel"] for r in report if not r["values"]]
            assert not empty, f"no data for: {empty}"
            flat = [r["panel"] for r in report if max(r["values"]) <= 0 and r["panel"] not in ZERO_HERE
                    and not (r["panel"] in MOMENT and r["when"] == "end")]
            assert not flat, f"only zeros (the event did not show) for: {flat}"
            stale = [r["panel"] for r in report if r["panel"] in ZERO_HERE and max(r["values"]) > 0]
            assert not stale, f"ZERO_HERE is out of date: these show values now: {stale}"
    finally:
        stop.set()
        await load
    assert len(queries) >= 50  # every panel target and variable was asked


def row(where: str, query: str, result: list[dict[str, Any]], when: str) -> dict[str, Any]:
    """One report line: what a dashboard query returned, at the end or while a request was held."""
    values = sorted({round(float(s["value"][1]), 6) for s in result if math.isfinite(float(s["value"][1]))})
    return {"panel": where, "query": query, "when": when, "series": len(result), "values": values[-6:],
            "labels": [s["metric"] for s in result][:4]}


def write_report(path: Path, report: list[dict[str, Any]]) -> None:
    """JSON for a .json path, else a Markdown table (for the issue's closing note)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(report, indent=1), encoding="utf-8")
        return
    lines = ["| panel [ref] | query (Grafana's variables at All) | asked | series | largest values |",
             "|---|---|---|---|---|"]
    for r in report:
        query = grafana_to_promql(r["query"]).replace("|", "\\|")
        values = ", ".join(f"{v:g}" for v in r["values"][-3:]) or "none"
        lines.append(f"| {r['panel']} | `{query}` | {r['when']} | {r['series']} | {values} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
