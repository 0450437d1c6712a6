"""Observability over loopback: /metrics parsed with prometheus-client's own parser, the access log,
the Grafana dashboard's queries checked against a live /metrics, and the separate metrics listener.

Every scenario scrapes /metrics the way Prometheus does and checks that the right series moved by
the right amount; the cluster fixture checks afterwards that no lease leaked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from pdproxy import cli
from pdproxy.app import METRICS, build_app, metrics_router, start_server
from pdproxy.mock import MockConfig, MockEngine
from pdproxy.settings import Settings
from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory, closed_port_url, sse_events

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "pdproxy-dashboard.json"
COMPLETIONS = "/v1/completions"
STREAM = {"model": "mock", "prompt": "hello there", "max_tokens": 5, "stream": True}
STREAM_WITH_USAGE = STREAM | {"stream_options": {"include_usage": True}}
PLAIN = {"model": "mock", "prompt": "hello there, general kenobi", "max_tokens": 3}
FAST_HEALTH = {"health_interval": 0.05, "health_timeout": 0.5, "health_rise": 1, "health_fall": 1}
ACCESS_FIELDS = {"time", "request_id", "endpoint", "client", "prefill_upstream", "decode_upstream", "status",
                 "prefill_ms", "ttft_ms", "total_ms", "bytes_out", "retries", "error"}

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One parsed /metrics page: families by name (counters keep `_total`) and samples."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            name = family.name + "_total" if family.type == "counter" else family.name
            self.types[name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    @property
    def names(self) -> set[str]:
        """Every sample name on the page (`_total`, `_bucket`, `_count`, … included)."""
        return {name for name, _ in self.samples}

    def has(self, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in self.samples

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series is absent (a labelled counter before its first event)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str, **match: str) -> dict[Labels, float]:
        """Every series of `name` whose labels include `match`."""
        return {labels: value for (sample, labels), value in self.samples.items()
                if sample == name and set(match.items()) <= set(labels)}

    def counted(self, name: str, **match: str) -> dict[Labels, float]:
        """The series that counted something (known label values are exported at 0 from the start)."""
        return {labels: value for labels, value in self.series(name, **match).items() if value}


async def scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Scrape(await resp.text())


async def settled_scrape(http: aiohttp.ClientSession, cluster: Cluster) -> Scrape:
    """Scrape once every request has been accounted (accounting runs as the handler ends)."""
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    return await scrape(http, cluster.url)


def usage_of(events: list[bytes]) -> dict[str, int]:
    """The `usage` object the engine put in the stream (include_usage: the last data chunk)."""
    chunks = [orjson.loads(event) for event in events if event != b"[DONE]"]
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    assert len(usages) == 1, usages
    return usages[0]


def used(engines: list[MockEngine], urls: list[str]) -> str:
    """The URL of the one engine that received a request."""
    (url,) = [url for engine, url in zip(engines, urls, strict=True) if engine.requests]
    return url


# -- a successful request ---------------------------------------------------------------------------


async def test_streamed_request_moves_every_stage_series_once(cluster: Cluster,
                                                              http: aiohttp.ClientSession) -> None:
    before = await scrape(http, cluster.url)
    async with http.post(cluster.url + COMPLETIONS, json=STREAM_WITH_USAGE) as resp:
        assert resp.status == 200
        usage = usage_of(sse_events(await resp.read()))
    after = await settled_scrape(http, cluster)
    prefill_url = used(cluster.prefill, cluster.prefill_urls)
    decode_url = cluster.decode_urls[0]

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("pdproxy_requests_total", endpoint=COMPLETIONS, status="200") == 1
    assert after.series("pdproxy_requests_total").keys() == {(("endpoint", COMPLETIONS), ("status", "200"))}
    assert moved("pdproxy_request_duration_seconds_count", endpoint=COMPLETIONS) == 1
    assert moved("pdproxy_time_to_first_token_seconds_count") == 1
    assert moved("pdproxy_prefill_duration_seconds_count", upstream=prefill_url) == 1
    assert after.series("pdproxy_prefill_duration_seconds_count").keys() == {(("upstream", prefill_url),)}
    assert moved("pdproxy_decode_duration_seconds_count") == 1
    assert moved("pdproxy_handoff_gap_seconds_count") == 1
    assert moved("pdproxy_upstream_requests_total", role="prefill", upstream=prefill_url, outcome="ok") == 1
    assert moved("pdproxy_upstream_requests_total", role="decode", upstream=decode_url, outcome="ok") == 1
    assert len(after.counted("pdproxy_upstream_requests_total")) == 2  # no other outcome, no other upstream
    assert moved("pdproxy_prompt_tokens_total") == usage["prompt_tokens"] > 0
    assert moved("pdproxy_completion_tokens_total") == usage["completion_tokens"] == STREAM["max_tokens"]
    assert after.value("pdproxy_requests_in_flight") == 0
    # The stages nest: the handoff gap is inside TTFT, which is inside the whole request.
    ttft = after.value("pdproxy_time_to_first_token_seconds_sum")
    assert 0 < after.value("pdproxy_handoff_gap_seconds_sum") < ttft
    assert ttft <= after.value("pdproxy_request_duration_seconds_sum", endpoint=COMPLETIONS)
    assert after.value("pdproxy_prefill_duration_seconds_sum", upstream=prefill_url) < ttft


async def test_non_streamed_request_counts_the_reported_usage(cluster: Cluster,
                                                              http: aiohttp.ClientSession) -> None:
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    chat = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with http.post(cluster.url + "/v1/chat/completions", json=chat) as resp:
        assert resp.status == 200
        chat_usage = (await resp.json())["usage"]
    after = await settled_scrape(http, cluster)
    assert after.value("pdproxy_prompt_tokens_total") == usage["prompt_tokens"] + chat_usage["prompt_tokens"]
    assert after.value("pdproxy_completion_tokens_total") == 3 + 2
    assert after.value("pdproxy_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert after.value("pdproxy_time_to_first_token_seconds_count") == 2  # whole answer = first byte


async def test_stream_without_include_usage_counts_no_tokens(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.post(cluster.url + COMPLETIONS, json=STREAM) as resp:
        assert resp.status == 200
        assert b'"usage"' not in await resp.read()
    after = await settled_scrape(http, cluster)
    assert after.value("pdproxy_requests_total", endpoint=COMPLETIONS, status="200") == 1
    assert after.has("pdproxy_prompt_tokens_total") and after.has("pdproxy_completion_tokens_total")
    assert after.value("pdproxy_prompt_tokens_total") == after.value("pdproxy_completion_tokens_total") == 0


async def test_kv_handoff_missing_stays_zero_when_prefill_returns_a_handle(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    for body in (STREAM, STREAM_WITH_USAGE, PLAIN):
        async with http.post(cluster.url + COMPLETIONS, json=body) as resp:
            assert resp.status == 200
            await resp.read()
    after = await settled_scrape(http, cluster)
    assert cluster.decode[0].stats.decodes_with_valid_handle == 3
    assert after.has("pdproxy_kv_handoff_missing_total")  # exported from the start, at 0
    assert after.value("pdproxy_kv_handoff_missing_total") == 0
    assert after.value("pdproxy_handoff_gap_seconds_count") == 3


# -- failures ---------------------------------------------------------------------------------------


async def test_failed_prefill_with_retry(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(prefill_policy="round_robin")
    bad, good = cluster.prefill_urls
    cluster.prefill[0].fail_next(500)
    async with http.post(cluster.url + COMPLETIONS, json=STREAM) as resp:
        assert resp.status == 200
        await resp.read()
    after = await settled_scrape(http, cluster)
    assert after.value("pdproxy_prefill_retries_total") == 1
    assert after.value("pdproxy_flow_retries_total") == 0
    assert after.value("pdproxy_upstream_requests_total", role="prefill", upstream=bad, outcome="bad_status") == 1
    assert after.value("pdproxy_upstream_requests_total", role="prefill", upstream=good, outcome="ok") == 1
    assert after.value("pdproxy_upstream_requests_total", role="prefill", upstream=bad, outcome="ok") == 0
    assert after.value("pdproxy_requests_total", endpoint=COMPLETIONS, status="200") == 1
    assert after.counted("pdproxy_timeouts_total") == {}


async def test_prefill_timeout_counts_once_and_answers_504(cluster_factory: ClusterFactory,
                                                           http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1, prefill_timeout=0.2)
    for engine in cluster.prefill:
        engine.hang_next()
    async with http.post(cluster.url + COMPLETIONS, json=STREAM) as resp:
        assert resp.status == 504
    after = await settled_scrape(http, cluster)
    assert after.value("pdproxy_timeouts_total", stage="prefill") == 1
    assert after.counted("pdproxy_timeouts_total").keys() == {(("stage", "prefill"),)}
    assert after.value("pdproxy_requests_total", endpoint=COMPLETIONS, status="504") == 1
    assert after.value("pdproxy_upstream_requests_total", role="prefill", upstream=cluster.prefill_urls[0],
                       outcome="timeout") == 1
    assert after.value("pdproxy_time_to_first_token_seconds_count") == 0
    assert after.value("pdproxy_decode_duration_seconds_count") == 0
    assert after.value("pdproxy_request_duration_seconds_count", endpoint=COMPLETIONS) == 1
    assert not cluster.decode[0].requests


async def test_client_disconnect_mid_stream(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=20))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + COMPLETIONS, json=STREAM | {"max_tokens": 500})
        assert resp.status == 200
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()  # gone mid-stream
        await cluster.decode[0].wait_until(lambda stats: stats.aborted == 1)
        after = await settled_scrape(session, cluster)
    assert after.value("pdproxy_client_disconnects_total", stage="decode") == 1
    assert after.counted("pdproxy_client_disconnects_total").keys() == {(("stage", "decode"),)}
    assert after.value("pdproxy_requests_total", endpoint=COMPLETIONS, status="499") == 1
    assert after.value("pdproxy_upstream_requests_total", role="decode", upstream=cluster.decode_urls[0],
                       outcome="cancelled") == 1
    assert after.value("pdproxy_time_to_first_token_seconds_count") == 1  # the first byte did go out
    assert after.value("pdproxy_decode_duration_seconds_count") == 0  # the decode never finished


# -- upstream gauges --------------------------------------------------------------------------------


async def test_upstream_gauges_follow_a_killed_prefill_server(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(**FAST_HEALTH)
    victim, survivor = cluster.prefill_urls
    for url in (*cluster.prefill_urls, *cluster.decode_urls):
        await cluster.wait_state(url, State.HEALTHY)
    before = await scrape(http, cluster.url)
    assert before.value("pdproxy_upstreams", role="prefill", state="healthy") == 2
    assert before.value("pdproxy_upstream_healthy", role="prefill", upstream=victim) == 1

    await cluster.kill(cluster.prefill[0])
    await cluster.wait_state(victim, State.UNHEALTHY)
    after = await scrape(http, cluster.url)
    assert after.value("pdproxy_upstream_healthy", role="prefill", upstream=victim) == 0
    assert after.value("pdproxy_upstream_healthy", role="prefill", upstream=survivor) == 1
    assert after.value("pdproxy_upstream_healthy", role="decode", upstream=cluster.decode_urls[0]) == 1
    assert after.value("pdproxy_upstreams", role="prefill", state="unhealthy") == 1
    assert after.value("pdproxy_upstreams", role="prefill", state="healthy") == 1
    assert after.value("pdproxy_upstreams", role="decode", state="healthy") == 1
    # Every (role, state) pair is exported, zeros included, so a state's line never vanishes from a graph.
    states = {state.value for state in State if state is not State.REMOVED}  # removed ones are not members
    for role in ("prefill", "decode"):
        per_state = after.series("pdproxy_upstreams", role=role)
        assert {dict(labels)["state"] for labels in per_state} == states
        assert sum(per_state.values()) == (2 if role == "prefill" else 1)
    assert after.value("pdproxy_upstream_in_flight", role="prefill", upstream=victim) == 0


async def test_upstream_gauges_count_leases_in_flight(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1, decode_config=MockConfig(role="decode", itl_ms=20))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + COMPLETIONS, json=STREAM | {"max_tokens": 500})
        assert (await resp.content.readany()).startswith(b"data: ")  # decoding now, prefill done
        during = await scrape(http, cluster.url)
        resp.close()
        await cluster.decode[0].wait_until(lambda stats: stats.aborted == 1)
    after = await settled_scrape(http, cluster)
    assert during.value("pdproxy_upstream_in_flight", role="decode", upstream=cluster.decode_urls[0]) == 1
    assert during.value("pdproxy_upstream_in_flight", role="prefill", upstream=cluster.prefill_urls[0]) == 0
    assert during.value("pdproxy_requests_in_flight") == 1
    assert after.value("pdproxy_upstream_in_flight", role="decode", upstream=cluster.decode_urls[0]) == 0
    assert after.value("pdproxy_requests_in_flight") == 0


async def admin(http: aiohttp.ClientSession, cluster: Cluster, method: str, *, json: Any = None, path: str = "",
                **params: str) -> tuple[int, dict[str, Any]]:
    async with http.request(method, cluster.url + "/admin/upstreams" + path, json=json, params=params) as resp:
        return resp.status, await resp.json()


async def test_upstream_series_appear_on_add_and_disappear_on_remove(cluster: Cluster,
                                                                     http: aiohttp.ClientSession) -> None:
    url = closed_port_url()
    status, _ = await admin(http, cluster, "POST", json={"role": "prefill", "url": url})
    assert status == 201
    added = await scrape(http, cluster.url)
    assert added.has("pdproxy_upstream_in_flight", role="prefill", upstream=url)
    assert added.value("pdproxy_upstream_healthy", role="prefill", upstream=url) == 0  # warming: no traffic yet
    assert added.value("pdproxy_upstreams", role="prefill", state="warming") == 1
    assert sum(added.series("pdproxy_upstreams", role="prefill").values()) == 3
    assert added.value("pdproxy_admin_changes_total", action="add") == 1

    status, _ = await admin(http, cluster, "DELETE", role="prefill", url=url)
    assert status == 200 and cluster.flow.prefill_pool.find(url) is None  # idle: removed at once
    removed = await scrape(http, cluster.url)
    assert [name for name, labels in removed.samples if ("upstream", url) in labels] == []
    assert sum(removed.series("pdproxy_upstreams", role="prefill").values()) == 2
    assert removed.value("pdproxy_admin_changes_total", action="remove") == 1


async def gated_prefill(serve_app: Callable[[web.Application], Awaitable[str]]
                        ) -> tuple[str, asyncio.Event, asyncio.Event]:
    """A prefill server that answers (with a handle) only once `release` is set; `arrived` when called."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.json_response({
            "id": "cmpl-gated", "object": "text_completion", "model": "mock",
            "choices": [{"index": 0, "text": " tok0", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1},
            "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1],
                                   "remote_engine_id": "gated", "remote_request_id": request.headers["X-Request-Id"],
                                   "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1},
        })

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(COMPLETIONS, completions)
    app.router.add_get("/health", health)
    return await serve_app(app), arrived, release


async def test_upstream_removed_while_busy_leaves_no_series(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession,
    serve_app: Callable[[web.Application], Awaitable[str]],
) -> None:
    gated, arrived, release = await gated_prefill(serve_app)
    cluster = await cluster_factory(n_prefill=1, extra_prefill=(gated,), prefill_policy="round_robin")
    request = asyncio.ensure_future(http.post(cluster.url + COMPLETIONS, json=PLAIN))
    await arrived.wait()  # round robin sent the first prefill to the gated server: it holds a lease now
    status, _ = await admin(http, cluster, "DELETE", role="prefill", url=gated)
    assert status == 202 and cluster.flow.prefill_pool.find(gated) is not None  # draining until its request ends
    release.set()
    async with await request as resp:
        assert resp.status == 200
    await cluster.flow.wait_idle()
    assert cluster.flow.prefill_pool.find(gated) is None  # removed once its lease came back
    after = await scrape(http, cluster.url)
    assert [(name, dict(labels)) for name, labels in after.samples if ("upstream", gated) in labels] == []


async def test_upstream_force_removed_mid_stream_leaves_no_series(cluster_factory: ClusterFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2, decode_policy="round_robin",
                                    decode_config=MockConfig(role="decode", itl_ms=20))
    victim = cluster.decode_urls[0]
    async with http.post(cluster.url + COMPLETIONS, json=STREAM | {"max_tokens": 500}) as resp:
        assert (await resp.content.readany()).startswith(b"data: ")
        status, _ = await admin(http, cluster, "DELETE", role="decode", url=victim, force="true")
        assert status == 200 and cluster.flow.decode_pool.find(victim) is None
        events = sse_events(await resp.read())
    assert "removed by an operator" in orjson.loads(events[-1])["error"]["message"]
    await cluster.flow.wait_idle()
    after = await scrape(http, cluster.url)
    assert [(name, dict(labels)) for name, labels in after.samples if ("upstream", victim) in labels] == []


# -- the metric set the issue asks for --------------------------------------------------------------

REQUIRED = [
    ("pdproxy_requests_total", "counter"),
    ("pdproxy_request_duration_seconds", "histogram"),
    ("pdproxy_requests_in_flight", "gauge"),
    ("pdproxy_prefill_duration_seconds", "histogram"),
    ("pdproxy_time_to_first_token_seconds", "histogram"),
    ("pdproxy_decode_duration_seconds", "histogram"),
    ("pdproxy_handoff_gap_seconds", "histogram"),
    ("pdproxy_inter_token_seconds", "histogram"),
    ("pdproxy_upstream_in_flight", "gauge"),
    ("pdproxy_upstream_requests_total", "counter"),
    ("pdproxy_upstream_healthy", "gauge"),
    ("pdproxy_upstream_ejections_total", "counter"),
    ("pdproxy_upstreams", "gauge"),
    ("pdproxy_prefill_retries_total", "counter"),
    ("pdproxy_flow_retries_total", "counter"),
    ("pdproxy_timeouts_total", "counter"),
    ("pdproxy_client_disconnects_total", "counter"),
    ("pdproxy_kv_handoff_missing_total", "counter"),
    ("pdproxy_queue_rejections_total", "counter"),
    ("pdproxy_prompt_tokens_total", "counter"),
    ("pdproxy_completion_tokens_total", "counter"),
    ("pdproxy_prefill_cached_prompt_tokens_total", "counter"),
    ("pdproxy_admin_changes_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_cpu_seconds_total", "counter"),
]


@pytest.mark.parametrize(("name", "kind"), REQUIRED)
def test_required_metric_is_declared(cluster_metrics_page: Scrape, name: str, kind: str) -> None:
    """A fresh proxy declares each one (a labelled counter shows its HELP and TYPE before its first event)."""
    assert cluster_metrics_page.types.get(name) == kind


@pytest.fixture
def cluster_metrics_page() -> Scrape:
    """The /metrics page of a freshly built proxy (the handler's body, no traffic)."""
    settings = Settings(prefill_servers=closed_port_url(), decode_servers=closed_port_url(), access_log=False)
    app = build_app(settings, rng=random.Random(0))
    return Scrape(app[METRICS].render().decode())


# -- the dashboard ----------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return panels


async def until_sample(cluster: Cluster, name: str, **labels: str) -> None:
    """Wait (bounded) until a counter has counted something; metrics announce no event to wait on."""
    deadline = asyncio.get_running_loop().time() + 3
    while not cluster.metric(name, **labels):
        assert asyncio.get_running_loop().time() < deadline, f"{name} {labels} never counted"
        await asyncio.sleep(0.01)


def dashboard_queries() -> list[str]:
    """Every PromQL text in the dashboard: panel targets and query variables."""
    exprs = [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


METRIC_NAME = re.compile(r"\b(?:pdproxy|process)_[a-z_]+\b")


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["title"] == "pdproxy"
    assert board["uid"] and board["schemaVersion"] >= 36
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    graphs = [p for p in panels if p["type"] != "row"]
    assert {p["type"] for p in graphs} <= {"timeseries", "stat"}
    assert len(graphs) >= 20
    for panel in graphs:
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, where
        assert panel["targets"], where
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", where
            assert METRIC_NAME.search(target["expr"]), where
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, where
    used_variables = {m for q in dashboard_queries() for m in re.findall(r"\$(\w+)", q)}
    assert used_variables - set(variables) <= {"__rate_interval", "__interval", "__range"}


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    exprs = "\n".join(dashboard_queries())
    titles = {p["title"] for p in dashboard_panels()}
    assert {"Request rate by status", "Error rate (5xx share)", "Time to first token", "Prefill time per P",
            "Decode duration", "In flight per upstream", "Upstream health", "Retries", "Ejections",
            "KV handoff gap", "Timeouts by stage", "Client disconnects by stage", "Tokens / s"} <= titles
    assert "sum by (status) (rate(pdproxy_requests_total" in exprs
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(pdproxy_time_to_first_token_seconds_bucket" in exprs
        assert f"histogram_quantile({quantile}, sum by (le, upstream) (rate(pdproxy_prefill_duration_seconds_bucket" \
            in exprs
    assert "histogram_quantile(0.99, sum by (le) (rate(pdproxy_handoff_gap_seconds_bucket" in exprs


async def test_every_metric_the_dashboard_queries_is_live(cluster_factory: ClusterFactory,
                                                          http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A little traffic, one of each event, then every name in every dashboard query must be a sample."""
    upstreams = tmp_path / "upstreams.yaml"
    upstreams.write_text("decode: [not yaml\n", encoding="utf-8")  # discovery: a bad file first (an error)
    cluster = await cluster_factory(
        prefill_policy="round_robin", eject_after=1, prefill_timeout=0.2, max_concurrency=1, queue_size=0,
        decode_config=MockConfig(role="decode", itl_ms=10),
        discovery="file", discovery_file=upstreams, discovery_interval=0.02,
    )
    await until_sample(cluster, "pdproxy_discovery_errors_total", source="file")
    # Then a good one that adds a decode server: it warms up and never takes traffic here (nothing listens).
    upstreams.with_name("tmp.yaml").write_text(f"decode: [{closed_port_url()}]\n", encoding="utf-8")
    upstreams.with_name("tmp.yaml").replace(upstreams)
    await until_sample(cluster, "pdproxy_discovery_changes_total", source="file", action="add")
    first, second = cluster.prefill
    # A prefill 500: retried on the other P, and the failing P ejected (eject_after=1).
    first.fail_next(500)
    async with http.post(cluster.url + COMPLETIONS, json=STREAM_WITH_USAGE) as resp:
        assert resp.status == 200
        await resp.read()
    await cluster.wait_state(cluster.prefill_urls[0], State.EJECTED)
    # A client gone mid-stream.
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + COMPLETIONS, json=STREAM | {"max_tokens": 500})
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
        await cluster.decode[0].wait_until(lambda stats: stats.aborted == 1)
    await cluster.flow.wait_idle()
    # A prefill that hangs past its timeout holds the only slot; a request meanwhile finds the queue full.
    second.hang_next()
    hanging = asyncio.ensure_future(http.post(cluster.url + COMPLETIONS, json=PLAIN))
    await second.wait_for_requests(3)  # the retried prefill, the disconnected stream's, and this one
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN) as resp:
        assert resp.status == 503
    async with await hanging as resp:
        assert resp.status == 504
    # A request the server refuses itself: more headers than --max-headers.
    async with http.get(cluster.url + "/health", headers={f"x-extra-{i}": "1" for i in range(200)}) as resp:
        assert resp.status == 431
    # An operator re-weights an upstream.
    reweighted = cluster.upstream(cluster.prefill_urls[1])
    status, _ = await admin(http, cluster, "PATCH", json={"weight": 2}, path=f"/{reweighted.id}")
    assert status == 200
    page = await settled_scrape(http, cluster)

    names = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    missing = sorted(names - page.names)
    assert not missing, f"the dashboard queries metrics that /metrics does not have: {missing}"
    # And the other way round: every pdproxy metric has a panel.
    ours = {name for name in page.types if name.startswith("pdproxy_") and not name.endswith("_created")}
    queried = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}
    assert sorted(ours - queried) == []


# -- the access log ---------------------------------------------------------------------------------

@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records of the `pdproxy.access` logger, captured even if it does not propagate."""
    logger = logging.getLogger("pdproxy.access")
    caplog.set_level(logging.INFO, logger="pdproxy.access")
    logger.addHandler(caplog.handler)
    records: list[logging.LogRecord] = []
    original_emit = caplog.handler.emit

    def emit(record: logging.LogRecord) -> None:
        if record.name == "pdproxy.access" and record not in records:
            records.append(record)
        original_emit(record)

    caplog.handler.emit = emit  # type: ignore[method-assign]
    yield records  # type: ignore[misc]
    logger.removeHandler(caplog.handler)


async def test_json_access_log_has_one_valid_line_per_request(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, access_lines: list[logging.LogRecord]
) -> None:
    cluster = await cluster_factory(access_log=True, access_log_format="json", prefill_policy="round_robin",
                                    eject_after=0)
    async with http.post(cluster.url + COMPLETIONS, json=STREAM, headers={"X-Request-Id": "req-stream"}) as resp:
        assert resp.status == 200
        streamed = await resp.read()
    cluster.prefill[1].fail_next(500)  # round robin: the second request goes to the second P first
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN, headers={"X-Request-Id": "req-retry"}) as resp:
        assert resp.status == 200
        plain = await resp.read()
    cluster.decode[0].fail_next(500, times=2)  # the only D fails before its first byte, and on the rerun
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN, headers={"X-Request-Id": "req-fail"}) as resp:
        assert resp.status == 502
    await cluster.flow.wait_idle()

    assert len(access_lines) == 3
    lines = [json.loads(record.getMessage()) for record in access_lines]
    for line in lines:
        assert set(line) == ACCESS_FIELDS
        datetime.fromisoformat(line["time"])
        assert line["endpoint"] == COMPLETIONS
        assert line["client"] == "127.0.0.1"
        assert line["decode_upstream"] == cluster.decode_urls[0]
        assert line["prefill_upstream"] in cluster.prefill_urls
        assert isinstance(line["total_ms"], float) and line["total_ms"] > 0
    ok, retried, failed = lines
    assert ok["request_id"] == "req-stream" and ok["status"] == 200
    assert ok["error"] is None and ok["retries"] == 0
    assert ok["bytes_out"] == len(streamed)
    assert 0 < ok["prefill_ms"] <= ok["ttft_ms"] <= ok["total_ms"]
    assert retried["request_id"] == "req-retry" and retried["status"] == 200 and retried["retries"] == 1
    assert retried["prefill_upstream"] == cluster.prefill_urls[0]  # where the prefill finally ran
    assert retried["bytes_out"] == len(plain)
    assert failed["request_id"] == "req-fail" and failed["status"] == 502 and failed["retries"] == 1
    assert failed["ttft_ms"] is None and failed["bytes_out"] == 0
    assert "answered 500" in failed["error"]


async def test_text_access_log_names_the_request_and_its_status(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, access_lines: list[logging.LogRecord]
) -> None:
    cluster = await cluster_factory(n_prefill=1, access_log=True, access_log_format="text")
    async with http.post(cluster.url + COMPLETIONS, json=STREAM, headers={"X-Request-Id": "text-1"}) as resp:
        assert resp.status == 200
        await resp.read()
    cluster.decode[0].fail_next(500, times=2)
    async with http.post(cluster.url + COMPLETIONS, json=PLAIN, headers={"X-Request-Id": "text-2"}) as resp:
        assert resp.status == 502
    await cluster.flow.wait_idle()
    messages = [record.getMessage() for record in access_lines]
    assert len(messages) == 2
    assert messages[0].startswith(f"text-1 127.0.0.1 {COMPLETIONS} 200 ")
    assert f"P={cluster.prefill_urls[0]}" in messages[0] and f"D={cluster.decode_urls[0]}" in messages[0]
    assert re.search(r" prefill_ms=\d+\.\d ttft_ms=\d+\.\d total_ms=\d+\.\d bytes=\d+ retries=0$", messages[0])
    assert messages[1].startswith(f"text-2 127.0.0.1 {COMPLETIONS} 502 ")
    assert "ttft_ms=- " in messages[1] and 'error="decode upstream' in messages[1]


async def test_a_request_refused_as_invalid_still_gets_an_access_log_line(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, access_lines: list[logging.LogRecord]
) -> None:
    cluster = await cluster_factory(access_log=True, access_log_format="json")
    async with http.post(cluster.url + COMPLETIONS, data=b"{not json", headers={"X-Request-Id": "bad-1"}) as resp:
        assert resp.status == 400
    assert cluster.metric("pdproxy_requests_total", endpoint=COMPLETIONS, status="400") == 1
    assert [json.loads(r.getMessage())["request_id"] for r in access_lines] == ["bad-1"]


async def test_serve_logging_writes_bare_json_access_lines(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --access-log-format json` (cli._setup_logging): each access line on stderr is one JSON object."""
    access = logging.getLogger("pdproxy.access")
    root = logging.getLogger()
    saved = (list(access.handlers), access.propagate, access.level, list(root.handlers), root.level)
    try:
        cli._setup_logging("info", "json")
        root.setLevel(logging.INFO)  # what basicConfig does outside pytest, whose handlers make it a no-op
        assert access.propagate is False
        cluster = await cluster_factory(n_prefill=1, access_log=True, access_log_format="json")
        async with http.post(cluster.url + COMPLETIONS, json=PLAIN, headers={"X-Request-Id": "cli-1"}) as resp:
            assert resp.status == 200
        await cluster.flow.wait_idle()
        for handler in access.handlers:
            handler.flush()
        err = capsys.readouterr().err
    finally:
        access.handlers[:], access.propagate, root.handlers[:] = saved[0], saved[1], saved[3]
        access.setLevel(saved[2])
        root.setLevel(saved[4])
    lines = [line for line in err.splitlines() if "cli-1" in line]
    assert len(lines) == 1, err
    assert set(json.loads(lines[0])) == ACCESS_FIELDS  # the whole line is the object: no prefix


# -- --metrics-port ---------------------------------------------------------------------------------


async def test_metrics_app_serves_metrics_alone(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    # The port is only recorded in the settings here: build_app never binds it (serve does).
    cluster = await cluster_factory(metrics_port=9)
    runner, metrics_url = await start_server(metrics_router(cluster.metrics), "127.0.0.1", 0)
    try:
        async with http.post(cluster.url + COMPLETIONS, json=PLAIN) as resp:
            assert resp.status == 200
        await cluster.flow.wait_idle()
        async with http.get(cluster.url + "/metrics") as resp:
            assert resp.status == 404  # not on the main port once it has its own
        page = await scrape(http, metrics_url)
        assert page.value("pdproxy_requests_total", endpoint=COMPLETIONS, status="200") == 1
        assert page.has("process_resident_memory_bytes")
        async with http.post(metrics_url + COMPLETIONS, json=PLAIN) as resp:
            assert resp.status == 404  # and the metrics listener proxies nothing
    finally:
        await runner.cleanup()
