"""OpenTelemetry tracing: span names, parents and attributes (the SDK's in-memory exporter), W3C context on both
legs, and nothing at all when off."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pdproxy.app import App, build_app, start_server
from pdproxy.mock import MockConfig, start_mock
from pdproxy.settings import Settings
from pdproxy.tracing import NO_TRACING, OtelTracing, build_tracing

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"


class Traced:
    def __init__(self, app: App, url: str, exporter: InMemorySpanExporter, engines: dict[str, Any]) -> None:
        self.app, self.url, self.exporter, self.engines = app, url, exporter, engines

    def spans(self) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        for span in self.exporter.get_finished_spans():
            found.setdefault(span.name, []).append(span)
        return found


@pytest.fixture
async def traced() -> AsyncIterator[Any]:
    made: list[Any] = []

    async def make(n_prefill: int = 1, **settings: Any) -> Traced:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        engines: dict[str, Any] = {}
        urls: dict[str, list[str]] = {"prefill": [], "decode": []}
        for role, count in (("prefill", n_prefill), ("decode", 1)):
            for _ in range(count):
                engine, runner, url = await start_mock(MockConfig(role=role))
                engines[url] = engine
                urls[role].append(url)
                made.append(runner)
        app = build_app(Settings(prefill_servers=",".join(urls["prefill"]), decode_servers=urls["decode"][0],
                                 access_log=False, **settings), rng=random.Random(0), tracing=OtelTracing(provider))
        runner, url = await start_server(app, "127.0.0.1", 0)
        made.append(runner)
        return Traced(app, url, exporter, engines)

    yield make
    for runner in reversed(made):
        await runner.cleanup()


async def test_a_pd_request_is_one_span_with_its_stages(traced: Any) -> None:
    t = await traced()
    async with aiohttp.ClientSession() as http:
        async with http.post(t.url + "/v1/completions", headers={"traceparent": TRACEPARENT, "X-Request-Id": "t1"},
                             json={"model": "mock", "prompt": "hi there", "max_tokens": 3, "stream": True}) as resp:
            assert resp.status == 200
            await resp.read()
    spans = t.spans()
    (request,) = spans["pdproxy.request"]
    assert request.kind is SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == CLIENT_TRACE  # the client's trace goes on
    assert format(request.parent.span_id, "016x") == CLIENT_PARENT
    assert request.attributes["pdproxy.request_id"] == "t1"
    assert request.attributes["http.route"] == "/v1/completions"
    assert request.attributes["http.response.status_code"] == 200
    for name in ("pdproxy.queue", "pdproxy.prefill", "pdproxy.decode.first_byte", "pdproxy.decode.stream"):
        (child,) = spans[name]
        assert child.parent.span_id == request.context.span_id, name
        assert child.context.trace_id == request.context.trace_id
        assert request.start_time <= child.start_time <= child.end_time <= request.end_time, name
    prefill, first_byte, stream = (spans[n][0] for n in ("pdproxy.prefill", "pdproxy.decode.first_byte",
                                                         "pdproxy.decode.stream"))
    assert prefill.kind is SpanKind.CLIENT and prefill.attributes["pdproxy.outcome"] == "ok"
    assert prefill.attributes["pdproxy.attempt"] == 0
    assert first_byte.end_time <= stream.start_time and stream.attributes["pdproxy.bytes_out"] > 0
    # each leg carries its own span's context, so the engines' spans hang under the proxy's
    leg_parents = {}
    for engine in t.engines.values():
        for recorded in engine.requests:
            parts = recorded.header("traceparent").split("-")
            assert parts[1] == CLIENT_TRACE
            leg_parents[engine.config.role] = parts[2]
    assert leg_parents["prefill"] == format(prefill.context.span_id, "016x")
    assert leg_parents["decode"] == format(first_byte.context.span_id, "016x")


async def test_each_prefill_attempt_is_a_span_and_failures_are_marked(traced: Any) -> None:
    t = await traced(n_prefill=2, prefill_policy="round_robin")
    for engine in t.engines.values():
        if engine.config.role == "prefill":
            engine.fail_next(500)
            break
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # round robin: one of them starts on the failing P
            body = {"model": "mock", "prompt": "a", "max_tokens": 1}
            async with http.post(t.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
    attempts = t.spans()["pdproxy.prefill"]
    failed = [s for s in attempts if s.status.status_code is StatusCode.ERROR]
    assert len(attempts) == 3 and len(failed) == 1
    assert failed[0].attributes["pdproxy.outcome"] == "bad_status"
    retried = next(s for s in attempts if s.attributes["pdproxy.attempt"] == 1)
    assert retried.parent.span_id == failed[0].parent.span_id  # both attempts under the one request span


async def test_a_failed_request_and_a_pass_through_route_are_traced(traced: Any) -> None:
    t = await traced()
    async with aiohttp.ClientSession() as http:
        async with http.post(t.url + "/tokenize", json={"prompt": "a b"}) as resp:
            assert resp.status == 200
        async with http.post(t.url + "/v1/completions", json={"model": "mock", "prompt": "x" * 10,
                                                               "max_tokens": 9000}) as resp:
            assert resp.status == 400  # the engine's own 4xx, relayed
    spans = t.spans()
    requests = {s.attributes["http.route"]: s for s in spans["pdproxy.request"]}
    (upstream,) = spans["pdproxy.upstream"]
    assert upstream.parent.span_id == requests["/tokenize"].context.span_id
    assert requests["/v1/completions"].attributes["http.response.status_code"] == 400


async def test_tracing_is_off_by_default_and_the_client_s_context_is_forwarded() -> None:
    assert build_tracing(None) is NO_TRACING
    engine, runner, url = await start_mock(MockConfig(role="both"))
    app = build_app(Settings(prefill_servers=url, decode_servers=url, access_log=False))
    assert app.flow.tracing is NO_TRACING
    proxy, proxy_url = await start_server(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy_url + "/v1/completions", headers={"traceparent": TRACEPARENT},
                                 json={"model": "mock", "prompt": "a", "max_tokens": 1}) as resp:
                assert resp.status == 200
        assert {r.header("traceparent") for r in engine.requests} == {TRACEPARENT}
    finally:
        await proxy.cleanup()
        await runner.cleanup()


def test_an_endpoint_builds_an_otlp_exporter() -> None:
    tracing = build_tracing("http://127.0.0.1:9/v1/traces", "pd-test")
    assert tracing.enabled
    tracing.shutdown()


async def test_a_hedged_prefill_is_two_attempt_spans_and_the_loser_is_no_error(traced: Any) -> None:
    import asyncio

    t = await traced(n_prefill=2, prefill_policy="round_robin", prefill_hedge_floor=0.05, prefill_timeout=1.5)
    prefills = [engine for engine in t.engines.values() if engine.config.role == "prefill"]
    for engine in prefills:
        engine.stop_answering()
    async with aiohttp.ClientSession() as http:
        body = {"model": "mock", "prompt": "a", "max_tokens": 1}
        request = asyncio.create_task(http.post(t.url + "/v1/completions", json=body))
        waits = [asyncio.ensure_future(e.wait_for_requests(1)) for e in prefills]
        _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED, timeout=2)
        for wait in pending:
            wait.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        hung = next(e for e in prefills if e.requests)  # the P of the first attempt
        next(e for e in prefills if e is not hung).resume_answering()
        async with await asyncio.wait_for(request, 2) as resp:
            assert resp.status == 200
        hung.resume_answering()
        await asyncio.gather(*(e.wait_for_requests(1) for e in prefills))
    attempts = {s.attributes["pdproxy.hedge"]: s for s in t.spans()["pdproxy.prefill"]}
    assert attempts[False].attributes["pdproxy.outcome"] == "hedged"
    assert attempts[False].status.status_code is not StatusCode.ERROR  # cancelled by the hedge: no one's fault
    assert attempts[True].attributes["pdproxy.outcome"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_fanned_out_request_is_one_span_with_a_flow_span_per_prompt(traced: Any, stream: bool) -> None:
    t = await traced()
    async with aiohttp.ClientSession() as http:
        async with http.post(t.url + "/v1/completions", headers={"traceparent": TRACEPARENT, "X-Request-Id": "fan"},
                             json={"model": "mock", "prompt": ["one", "two"], "n": 2, "max_tokens": 2,
                                   "stream": stream}) as resp:
            assert resp.status == 200
            await resp.read()
    spans = t.spans()
    (request,) = spans["pdproxy.request"]  # one span for the client's request, not one per flow
    assert format(request.parent.span_id, "016x") == CLIENT_PARENT
    assert request.attributes["pdproxy.request_id"] == "fan"
    assert request.attributes["http.response.status_code"] == 200
    flows = spans["pdproxy.flow"]
    assert sorted(f.attributes["pdproxy.flow_index"] for f in flows) == [0, 1, 2, 3]
    assert sorted(f.attributes["pdproxy.request_id"] for f in flows) == [f"fan-{k}" for k in range(4)]
    assert {f.parent.span_id for f in flows} == {request.context.span_id}
    assert all(f.context.trace_id == request.context.trace_id for f in flows)
    flow_ids = {f.context.span_id for f in flows}
    for name in ("pdproxy.queue", "pdproxy.prefill", "pdproxy.decode.first_byte"):
        assert len(spans[name]) == 4, name
        assert {s.parent.span_id for s in spans[name]} == flow_ids, name
