"""Metrics and access-log formats without a network: token usage found in engine answers, one registry
per application, the scrape-time upstream collector, naming rules, and the access-log line shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdproxy.flow import Trace, reported_usage
from pdproxy.metrics import LATENCY_BUCKETS, Metrics, UpstreamCollector
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
