"""Metrics and access-log formats without a network: token usage found in engine answers, one registry
per application, the scrape-time upstream collector, naming rules, and the access-log line shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from pdproxy.metrics import LATENCY_BUCKETS, Metrics, UpstreamCollector, merge_expositions
from pdproxy.proxy.record import RequestRecord as Trace
from pdproxy.proxy.record import reported_usage
from pdproxy.upstreams import Lease, Role, State, Upstream, UpstreamPool

# ---------------------------------------------------------------- reported_usage


def sse(*payloads: object) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else orjson.dumps(p)) + b"\n\n" for p in payloads)


def chunk(text: str, usage: object = None) -> dict[str, object]:
    """A vLLM completion chunk; with include_usage every chunk carries `"usage": null` but the last."""
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": None}], "usage": usage}


def test_usage_of_a_non_streamed_body() -> None:
    body = orjson.dumps({
        "id": "cmpl-1", "object": "text_completion", "model": "m",
        "choices": [{"index": 0, "text": " hi there", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3},
    })
    assert reported_usage(body) == (12, 3)


def test_usage_of_a_stream_is_the_final_usage_chunk() -> None:
    stream = sse(chunk(" a"), chunk(" b"),
                 {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                  "usage": {"prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 2}},
                 b"[DONE]")
    assert reported_usage(stream) == (7, 2)


def test_usage_with_token_details_counts_the_totals_only() -> None:
    usage = {"prompt_tokens": 40, "total_tokens": 45, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 32},
             "completion_tokens_details": {"reasoning_tokens": 4, "accepted_prediction_tokens": 0}}
    stream = sse(chunk(" a"), {"id": "c", "choices": [], "usage": usage}, b"[DONE]")
    assert reported_usage(stream) == (40, 5)
    details_first = b'{"usage":{"prompt_tokens_details":{"cached_tokens":32},"prompt_tokens":40,' \
                    b'"completion_tokens_details":null,"completion_tokens":5,"total_tokens":45}}'
    assert reported_usage(details_first) == (40, 5)


def test_usage_split_over_two_reads_is_found_in_their_join() -> None:
    """The relay keeps the tail of the read before the last one: a usage cut in two is joined again."""
    stream = sse(chunk(" a"), {"id": "c", "choices": [], "usage": {
        "prompt_tokens": 40, "total_tokens": 45, "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 32}}}, b"[DONE]")
    for cut in range(stream.rfind(b'"usage"'), len(stream)):
        before, last = stream[:cut], stream[cut:]
        assert reported_usage(before[-256:] + last) == (40, 5), cut


@pytest.mark.parametrize(
    "data",
    [
        b"",
        sse(chunk(" a"), chunk(" b"), b"[DONE]"),  # include_usage off: only nulls
        sse(chunk(" a"), b"[DONE]").replace(b'"usage":null', b""),  # no usage key at all
        orjson.dumps({"choices": [{"text": 'the word "usage" and "prompt_tokens": 3'}]}),  # inside a string
        b'{"usage":{"prompt_tokens":3}}',  # incomplete
    ],
    ids=["empty", "null-usage", "no-usage", "quoted-in-text", "incomplete"],
)
def test_no_usage_is_none(data: bytes) -> None:
    assert reported_usage(data) is None


# ---------------------------------------------------------------- Metrics


def parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_metrics_instances_are_independent_registries() -> None:
    first, second = Metrics(), Metrics()  # two apps in one process: no "Duplicated timeseries" error
    assert first.registry is not second.registry
    first.requests.labels("/v1/completions", "200").inc()
    first.prefill_retries.inc(2)
    first.ttft.observe(0.3)
    a, b = parse(first.render()), parse(second.render())
    assert a[("pdproxy_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert ("pdproxy_requests_total", (("endpoint", "/v1/completions"), ("status", "200"))) not in b
    assert a[("pdproxy_prefill_retries_total", ())] == 2 and b[("pdproxy_prefill_retries_total", ())] == 0
    assert a[("pdproxy_time_to_first_token_seconds_count", ())] == 1
    assert b[("pdproxy_time_to_first_token_seconds_count", ())] == 0
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= {name for name, _ in b}


def test_metric_names_follow_the_conventions() -> None:
    """pdproxy_* names with units; counters end in _total; latencies are histograms in seconds."""
    families = list(text_string_to_metric_families(Metrics().render().decode()))
    ours = [f for f in families if f.name.startswith("pdproxy_")]
    assert len(ours) >= 20
    assert all(f.name.startswith(("pdproxy_", "process_", "python_")) for f in families)
    assert len({f.name for f in ours}) == len(ours)
    for family in ours:
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert family.documentation, family.name


def test_latency_buckets_span_milliseconds_to_tens_of_minutes() -> None:
    assert LATENCY_BUCKETS == tuple(sorted(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[0] <= 0.001 and LATENCY_BUCKETS[-1] >= 1200
    bounds = {s.labels["le"] for f in text_string_to_metric_families(Metrics().render().decode())
              if f.name == "pdproxy_time_to_first_token_seconds" for s in f.samples if s.name.endswith("_bucket")}
    assert {"0.001", "1200.0", "+Inf"} <= bounds


def monitoring_docs() -> str:
    """The README's "Monitoring" section."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^## Monitoring\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, "no '## Monitoring' section in README.md"
    return found.group(1)


def test_every_metric_is_documented() -> None:
    documented = set(re.findall(r"^\| `(pdproxy_[a-z_]+)` \|", monitoring_docs(), re.M))
    metrics = Metrics()
    metrics.watch_upstreams(list, (state.value for state in State))  # as the app does, here with no pools
    families = text_string_to_metric_families(metrics.render().decode())
    defined = {f.name + "_total" if f.type == "counter" else f.name for f in families
               if f.name.startswith("pdproxy_") and not f.name.endswith("_created")}
    assert sorted(defined - documented) == []
    assert sorted(documented - defined) == []


# ---------------------------------------------------------------- UpstreamCollector


def pools() -> dict[Role, UpstreamPool]:
    return {
        Role.PREFILL: UpstreamPool(Role.PREFILL, [
            Upstream(Role.PREFILL, "http://p0:8000", state=State.HEALTHY),
            Upstream(Role.PREFILL, "http://p1:8000", state=State.EJECTED),
            Upstream(Role.PREFILL, "http://p2:8000"),  # unknown: routable
        ]),
        Role.DECODE: UpstreamPool(Role.DECODE, [
            Upstream(Role.DECODE, "http://d0:8000", state=State.HEALTHY),
            Upstream(Role.DECODE, "http://d1:8000", state=State.DRAINING),
        ]),
    }


def collect(by_role: dict[Role, UpstreamPool]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(UpstreamCollector(  # type: ignore[arg-type]
        lambda: [u for pool in by_role.values() for u in pool.members], (s.value for s in State)))
    return parse(generate_latest(registry))


def test_upstream_collector_reports_each_upstream_and_each_state() -> None:
    by_role = pools()
    d0 = by_role[Role.DECODE].members[0]
    leases = [Lease(d0), Lease(d0), Lease(by_role[Role.PREFILL].members[0])]
    samples = collect(by_role)
    for lease in leases:
        lease.release()

    def get(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert get("pdproxy_upstream_in_flight", role="decode", upstream="http://d0:8000") == 2
    assert get("pdproxy_upstream_in_flight", role="prefill", upstream="http://p0:8000") == 1
    assert get("pdproxy_upstream_in_flight", role="prefill", upstream="http://p1:8000") == 0
    healthy = {dict(labels)["upstream"]: value for (name, labels), value in samples.items()
               if name == "pdproxy_upstream_healthy"}
    assert healthy == {"http://p0:8000": 1, "http://p1:8000": 0, "http://p2:8000": 1,
                       "http://d0:8000": 1, "http://d1:8000": 0}
    per_state = {(dict(labels)["role"], dict(labels)["state"]): value for (name, labels), value in samples.items()
                 if name == "pdproxy_upstreams"}
    assert set(per_state) == {(role, state.value) for role in ("prefill", "decode") for state in State}
    assert per_state[("prefill", "healthy")] == per_state[("prefill", "ejected")] == 1
    assert per_state[("prefill", "unknown")] == 1
    assert per_state[("decode", "healthy")] == per_state[("decode", "draining")] == 1
    assert sum(per_state.values()) == 5
    assert per_state[("decode", "unhealthy")] == 0


def test_upstream_collector_reads_the_pools_at_scrape_time() -> None:
    by_role = pools()
    gone = by_role[Role.PREFILL].members[1]
    by_role[Role.PREFILL].remove(gone)
    by_role[Role.DECODE].members[0].state = State.UNHEALTHY
    samples = collect(by_role)
    assert not [key for key in samples if ("upstream", gone.url) in key[1]]
    assert samples[("pdproxy_upstreams", (("role", "prefill"), ("state", "ejected")))] == 0
    assert samples[("pdproxy_upstreams", (("role", "decode"), ("state", "unhealthy")))] == 1
    assert samples[("pdproxy_upstream_healthy", (("role", "decode"), ("upstream", "http://d0:8000")))] == 0


def test_upstream_collector_with_empty_pools_still_exports_every_state() -> None:
    samples = collect({Role.PREFILL: UpstreamPool(Role.PREFILL), Role.DECODE: UpstreamPool(Role.DECODE)})
    assert {name for name, _ in samples} == {"pdproxy_upstreams"}
    assert len(samples) == 2 * len(State) and not any(samples.values())



# ---------------------------------------------------------------- merged expositions (worker processes)


def exposition(requests: int, latency: float, *, extra: bool = False) -> str:
    """A real prometheus-client exposition: labelled and bare counters, a labelled histogram, a gauge, a
    summary, a labelled family with no samples yet, and a label value that needs escaping."""
    disable_created_metrics()  # as Metrics() does (process-wide): no `_created` twins
    registry = CollectorRegistry()
    Counter("app_requests", "Requests.", ("endpoint", "status"), registry=registry).labels("/v1/x", "200").inc(
        requests)
    Counter("app_plain", "No labels.", registry=registry).inc(requests)
    Histogram("app_latency_seconds", "Latency.", ("endpoint",), buckets=(0.1, 1), registry=registry) \
        .labels("/v1/x").observe(latency)
    Gauge("app_in_flight", "In flight.", registry=registry).set(requests)
    Summary("app_size_bytes", "Sizes.", registry=registry).observe(10)
    Counter("app_ejections", "None yet.", ("upstream",), registry=registry)
    Counter("app_odd", "Odd label.", ("path",), registry=registry).labels(ODD).inc()
    if extra:
        Gauge("app_only_here", "Only in one process.", registry=registry).set(7)
    return generate_latest(registry).decode()


ODD = 'a b{c}="d"\\ e'


def by_worker(family: object) -> dict[tuple[str, str], float]:
    """{(sample name, worker): value} of a family's samples."""
    return {(s.name, s.labels["worker"]): s.value for s in family.samples}  # type: ignore[attr-defined]


def test_merged_exposition_has_each_family_once_and_every_sample_labelled() -> None:
    merged = merge_expositions({"0": exposition(3, 0.05), "1": exposition(5, 0.5, extra=True)}, "worker")
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert set(families) == {"app_requests", "app_plain", "app_latency_seconds", "app_in_flight",
                             "app_size_bytes", "app_ejections", "app_odd", "app_only_here"}
    for line in merged.splitlines():  # the text format forbids a family twice
        if line.startswith("#"):
            assert merged.count(line + "\n") == 1, line
    assert [line.split()[2] for line in merged.splitlines() if line.startswith("# TYPE")] == \
        [line.split()[2] for line in merged.splitlines() if line.startswith("# HELP")]
    assert families["app_latency_seconds"].type == "histogram" and families["app_requests"].type == "counter"
    requests = {s.labels["worker"]: s for s in families["app_requests"].samples}
    assert requests["0"].value == 3 and requests["1"].value == 5
    assert requests["1"].labels == {"worker": "1", "endpoint": "/v1/x", "status": "200"}
    assert by_worker(families["app_plain"]) == {("app_plain_total", "0"): 3, ("app_plain_total", "1"): 5}
    buckets = [s for s in families["app_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert {(s.labels["worker"], s.labels["le"], s.value) for s in buckets} == {
        ("0", "0.1", 1), ("0", "1.0", 1), ("0", "+Inf", 1), ("1", "0.1", 0), ("1", "1.0", 1), ("1", "+Inf", 1)}
    assert by_worker(families["app_size_bytes"])[("app_size_bytes_count", "1")] == 1
    assert [(s.labels["worker"], s.labels["path"]) for s in families["app_odd"].samples] == [("0", ODD), ("1", ODD)]
    assert by_worker(families["app_only_here"]) == {("app_only_here", "1"): 7}
    assert families["app_ejections"].samples == []


def test_merged_exposition_of_the_proxy_metrics() -> None:
    one, two = Metrics(), Metrics()
    one.requests.labels("/v1/completions", "200").inc(2)
    two.requests.labels("/v1/completions", "200").inc(4)
    two.ttft.observe(0.2)
    merged = merge_expositions({"0": one.render().decode(), "1": two.render().decode()}, "worker")
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert set(families) == {family.name for family in text_string_to_metric_families(one.render().decode())}
    assert merged.count("# HELP pdproxy_requests_total ") == 1
    assert by_worker(families["pdproxy_requests"]) == {("pdproxy_requests_total", "0"): 2,
                                                       ("pdproxy_requests_total", "1"): 4}
    ttft = by_worker(families["pdproxy_time_to_first_token_seconds"])
    assert ttft[("pdproxy_time_to_first_token_seconds_count", "0")] == 0
    assert ttft[("pdproxy_time_to_first_token_seconds_count", "1")] == 1
    assert by_worker(families["process_open_fds"])[("process_open_fds", "1")] > 0


def test_merged_exposition_keeps_timestamps_and_needs_no_input() -> None:
    assert merge_expositions({}, "worker") == ""
    assert merge_expositions({"0": 'bare 1\nx{a="b"} 2 1700000000\n'}, "w") == \
        'bare{w="0"} 1\nx{w="0",a="b"} 2 1700000000\n'

# ---------------------------------------------------------------- access-log lines

ACCESS_FIELDS = ["time", "request_id", "endpoint", "client", "prefill_upstream", "decode_upstream", "status",
                 "prefill_ms", "ttft_ms", "total_ms", "bytes_out", "retries", "error"]


def trace(**fields: object) -> Trace:
    values: dict[str, object] = {"request_id": "r-1", "endpoint": "/v1/completions", "start": 0.0,
                                 "client": "10.1.2.3"}
    return Trace(**(values | fields))  # type: ignore[arg-type]


def test_json_line_has_every_field_in_order() -> None:
    done = trace(prefill_upstream="http://p0:8000", decode_upstream="http://d0:8000", status=200,
                 prefill_s=0.0123456, ttft_s=0.02, retries=1, bytes_out=512)
    line = json.loads(done.as_json(1.5))
    assert list(line) == ACCESS_FIELDS
    assert line["status"] == 200 and line["retries"] == 1 and line["bytes_out"] == 512
    assert line["prefill_ms"] == 12.346 and line["ttft_ms"] == 20.0 and line["total_ms"] == 1500.0
    assert line["error"] is None
    assert line["time"].endswith("+00:00")


def test_json_line_of_a_failure_before_any_stage() -> None:
    failed = trace(status=503, error='no routable "decode" upstream\nat all')
    text = failed.as_json(0.001)
    assert "\n" not in text  # one line, whatever the error says
    line = json.loads(text)
    assert line["prefill_upstream"] == line["decode_upstream"] == "-"
    assert line["prefill_ms"] is None and line["ttft_ms"] is None
    assert line["error"] == 'no routable "decode" upstream\nat all'


def test_text_line_reads_left_to_right() -> None:
    done = trace(prefill_upstream="http://p0:8000", decode_upstream="http://d0:8000", status=200,
                 prefill_s=0.0123, ttft_s=0.02, bytes_out=512)
    assert done.as_text(1.5) == ("r-1 10.1.2.3 /v1/completions 200 P=http://p0:8000 D=http://d0:8000 "
                                 "prefill_ms=12.3 ttft_ms=20.0 total_ms=1500.0 bytes=512 retries=0")
    failed = trace(status=504, error="prefill timed out")
    assert failed.as_text(0.2).endswith('prefill_ms=- ttft_ms=- total_ms=200.0 bytes=0 retries=0 '
                                        'error="prefill timed out"')
