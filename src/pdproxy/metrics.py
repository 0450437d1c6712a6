"""Every Prometheus metric of the proxy, defined once, in a registry per application.

Per-upstream gauges are read from the pools at scrape time by a collector, so
they cost nothing on the request path and vanish with a removed upstream.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# LLM latencies: a millisecond handoff up to a twenty-minute generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                   300, 600, 1200)
SMALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

# Label values known in advance. Their series are exported at 0 from the start: Prometheus's rate() and
# increase() cannot see a counter's first step when its series is born at 1, so a one-off event (a
# timeout, an ejection) would never show on the dashboard.
UPSTREAM_OUTCOMES = ("ok", "rejected", "bad_status", "bad_response", "connect_error", "timeout", "broken",
                     "cancelled")
TIMEOUT_STAGES = ("prefill", "connect", "decode_first_byte", "decode_response", "stream_idle", "decode_total")
# won: the hedge answered first; lost: the first attempt did; failed: every hedged attempt failed; cancelled: the
# client left; over_budget / no_upstream: due but not sent (the budget was used up / no other P could take it).
HEDGE_RESULTS = ("won", "lost", "failed", "cancelled", "over_budget", "no_upstream")
DISCONNECT_STAGES = ("queue", "prefill", "decode")
PD_SKIP_REASONS = ("short_prompt", "cached_prompt")  # handoff.skip.SkipReason
QUEUE_REJECTION_REASONS = ("full", "timeout")
# What the HTTP server refuses or cuts itself (pdproxy.http.server's on_event reasons, client_closed aside).
CLIENT_REFUSAL_REASONS = ("header_timeout", "body_timeout", "keepalive_timeout", "send_timeout", "too_large",
                          "headers_too_large", "body_budget", "max_connections", "malformed")
ADMIN_ACTIONS = ("add", "remove", "force_remove", "drain", "undrain", "update")
DISCOVERY_ACTIONS = ("add", "remove", "drain", "undrain", "update")


class _LoopValue:
    """A sample's value without prometheus-client's per-value mutex.

    Every update happens on the event loop's thread (each worker process has its own registry; the
    threads pdproxy starts read files and never touch a metric), so the lock only cost time.
    """

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


class LoopCounter(Counter):
    """prometheus-client's Counter (same exposition, same API) with a lock-free value and a short `inc`."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._value = _LoopValue()  # type: ignore[assignment]

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar or (self._labelnames and not self._labelvalues):
            super().inc(amount, exemplar)  # its errors (negative, a parent without labels) and exemplars
            return
        self._value._value += amount  # type: ignore[attr-defined]


class LoopHistogram(Histogram):
    """prometheus-client's Histogram with lock-free values and a bisecting `observe` (same buckets, same
    exposition: each observation lands in the first bucket whose bound is >= it)."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._sum = _LoopValue()  # type: ignore[assignment]
        self._buckets = [_LoopValue() for _ in self._upper_bounds]  # type: ignore[misc]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or amount != amount or (self._labelnames and not self._labelvalues):
            super().observe(amount, exemplar)  # exemplars, NaN (no bucket) and the parent's error
            return
        self._sum._value += amount  # type: ignore[attr-defined]
        self._buckets[bisect_left(self._upper_bounds, amount)]._value += 1  # type: ignore[attr-defined]


class UpstreamCollector:
    """Scrape-time view of the pools: in-flight, health and counts per state."""

    def __init__(self, upstreams: Callable[[], Iterable[Any]], states: Iterable[str],
                 on_seen: Callable[[str, str], None] = lambda role, url: None) -> None:
        self._upstreams = upstreams
        self._states = tuple(states)
        self._on_seen = on_seen  # told every upstream at each scrape (to create its counters at 0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("pdproxy_upstream_in_flight", "Requests leased to the upstream now.",
                                      labels=("role", "upstream"))
        healthy = GaugeMetricFamily("pdproxy_upstream_healthy", "1 if the upstream is routable, else 0.",
                                    labels=("role", "upstream"))
        per_state = GaugeMetricFamily("pdproxy_upstreams", "Upstreams by role and state.",
                                      labels=("role", "state"))
        counts: dict[tuple[str, str], int] = {}
        for upstream in self._upstreams():
            role = upstream.role.value
            self._on_seen(role, upstream.url)
            in_flight.add_metric((role, upstream.url), upstream.in_flight)
            healthy.add_metric((role, upstream.url), 1 if upstream.routable else 0)
            key = (role, upstream.state.value)
            counts[key] = counts.get(key, 0) + 1
        for role in ("prefill", "decode"):
            for state in self._states:
                per_state.add_metric((role, state), counts.get((role, state), 0))
        yield in_flight
        yield healthy
        yield per_state


class PoolCollector:
    """Scrape-time view of each pool as a whole: whether it is in healthy panic."""

    def __init__(self, pools: Iterable[Any]) -> None:
        self._pools = tuple(pools)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        panic = GaugeMetricFamily("pdproxy_pool_panic",
                                  "1 while too few of the pool's members are healthy and it routes to all of them "
                                  "(--healthy-panic-threshold), else 0.", labels=("role",))
        for pool in self._pools:
            panic.add_metric((pool.role.value,), 1 if pool.check_panic() else 0)
        yield panic


class Metrics:
    """The proxy's metrics; one instance (and registry) per application."""

    def __init__(self) -> None:
        disable_created_metrics()  # process-wide in prometheus-client: no `*_created` twin for every series
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = LoopCounter("pdproxy_requests", "Client requests by endpoint and final status.",
                                    ("endpoint", "status"), registry=registry)
        self.request_duration = LoopHistogram("pdproxy_request_duration_seconds",
                                              "Request in to last byte out.", ("endpoint",),
                                              buckets=LATENCY_BUCKETS, registry=registry)
        self.requests_in_flight = Gauge("pdproxy_requests_in_flight", "Client requests being served.",
                                        registry=registry)
        self.prefill_duration = LoopHistogram("pdproxy_prefill_duration_seconds",
                                              "Prefill request sent to prefill answer read.", ("upstream",),
                                              buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = LoopHistogram("pdproxy_time_to_first_token_seconds",
                                  "Client view: request in to first decode byte out.",
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_duration = LoopHistogram("pdproxy_decode_duration_seconds",
                                             "Decode request sent to the end of its response.",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = LoopHistogram("pdproxy_inter_token_seconds",
                                         "Gaps between decode stream chunks (a sample of streams; a chunk may "
                                         "carry several tokens).", buckets=(*SMALL_BUCKETS, 2.5, 5, 10, 30),
                                         registry=registry)
        self.prompt_tokens = LoopCounter("pdproxy_prompt_tokens", "Prompt tokens, as reported in the engines' usage.",
                                         registry=registry)
        self.prefill_cached_tokens = LoopCounter(
            "pdproxy_prefill_cached_prompt_tokens",
            "Prompt tokens the prefill servers found in their prefix cache (what the client's usage reports "
            "as cached_tokens).", registry=registry)
        self.completion_tokens = LoopCounter("pdproxy_completion_tokens",
                                             "Completion tokens, as reported in the engines' usage.", registry=registry)
        self.fanout_requests = LoopCounter("pdproxy_fanout_requests",
                                           "Requests fanned out into several PD flows (a batch of prompts, n > 1), "
                                           "counted as they arrive (those the queue refuses whole included).",
                                           registry=registry)
        self.fanout_flows = LoopCounter("pdproxy_fanout_flows",
                                        "PD flows of the fanned-out requests (prompts x n each), counted with them.",
                                        registry=registry)
        self.handoff_gap = LoopHistogram("pdproxy_handoff_gap_seconds",
                                         "Prefill answer read to decode request sent (must stay tiny).",
                                         buckets=SMALL_BUCKETS, registry=registry)
        self.upstream_requests = LoopCounter("pdproxy_upstream_requests",
                                             "Upstream calls by outcome (ok, rejected, bad_status, "
                                             "bad_response, connect_error, timeout, broken, kv_lost, "
                                             "cancelled, hedged: cancelled as another attempt answered first).",
                                             ("role", "upstream", "outcome"), registry=registry)
        self.prefill_retries = LoopCounter("pdproxy_prefill_retries", "Prefills re-run on another server.",
                                           registry=registry)
        self.prefill_hedges = LoopCounter("pdproxy_prefill_hedges",
                                          "Prefill attempts hedged on another server after their hedge delay, "
                                          "by result (won, lost, failed, cancelled; over_budget and no_upstream: "
                                          "due but not sent).", ("result",), registry=registry)
        self.flow_retries = LoopCounter("pdproxy_flow_retries",
                                        "Whole PD flows re-run after a decode failed before its first byte.",
                                        registry=registry)
        self.ejections = LoopCounter("pdproxy_upstream_ejections", "Passive ejections (outlier detection).",
                                     ("role", "upstream"), registry=registry)
        self.queue_rejections = LoopCounter("pdproxy_queue_rejections",
                                            "Requests refused with 503 at admission (queue full or wait too long).",
                                            ("reason",), registry=registry)
        self.admin_changes = LoopCounter("pdproxy_admin_changes", "Membership changes through the admin API.",
                                         ("action",), registry=registry)
        self.queue_waiting = Gauge("pdproxy_queue_waiting", "Requests waiting for a slot.", registry=registry)
        self.timeouts = LoopCounter("pdproxy_timeouts", "Upstream timeouts by stage.", ("stage",),
                                    registry=registry)
        self.client_disconnects = LoopCounter("pdproxy_client_disconnects",
                                              "Clients gone before their response ended, by stage.",
                                              ("stage",), registry=registry)
        self.client_refusals = LoopCounter("pdproxy_client_refusals",
                                           "Requests and connections refused or cut by the proxy itself (client-side "
                                           "limits, malformed HTTP), by reason.", ("reason",), registry=registry)
        self.kv_handoff_missing = LoopCounter("pdproxy_kv_handoff_missing",
                                              "Prefill answers without kv_transfer_params (D recomputes).",
                                              registry=registry)
        self.pd_skipped = LoopCounter("pdproxy_pd_skipped",
                                      "Requests sent to a decode server alone, without prefill, because "
                                      "disaggregation would not pay (--pd-min-prompt-tokens), by reason.",
                                      ("reason",), registry=registry)
        self.discovery_updates = LoopCounter("pdproxy_discovery_updates",
                                             "Complete upstream lists read from the discovery source.", ("source",),
                                             registry=registry)
        self.discovery_errors = LoopCounter("pdproxy_discovery_errors",
                                            "Looks at the discovery source that failed (the last list was kept).",
                                            ("source",), registry=registry)
        self.discovery_changes = LoopCounter("pdproxy_discovery_changes",
                                             "Membership changes made by discovery (add, remove, drain, undrain, "
                                             "update).", ("source", "action"), registry=registry)
        self.discovery_last_success = Gauge("pdproxy_discovery_last_success_timestamp_seconds",
                                            "Unix time of the last good list from the discovery source.",
                                            ("source",), registry=registry)

        for labels, values in ((self.timeouts, TIMEOUT_STAGES), (self.client_disconnects, DISCONNECT_STAGES),
                               (self.queue_rejections, QUEUE_REJECTION_REASONS), (self.admin_changes, ADMIN_ACTIONS),
                               (self.client_refusals, CLIENT_REFUSAL_REASONS), (self.pd_skipped, PD_SKIP_REASONS),
                               (self.prefill_hedges, HEDGE_RESULTS)):
            for value in values:
                labels.labels(value)
        self._zeroed: set[tuple[str, str]] = set()  # upstreams whose counters exist
        # Label children looked up once: `labels()` takes a lock and builds a key on every call. The
        # per-upstream caches lose an upstream's entries in forget_upstream, with its series.
        self._request_children: dict[tuple[str, int], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._prefill_children: dict[str, Any] = {}
        self._outcome_children: dict[tuple[str, str, str], Any] = {}

    def watch_upstreams(self, upstreams: Callable[[], Iterable[Any]], states: Iterable[str]) -> None:
        """Expose the pools' live state at scrape time (and each upstream's counters, at 0 until counted:
        an upstream added at runtime gets them at the first scrape that sees it)."""
        for upstream in upstreams():  # the configured ones at once, so the very first scrape has them
            self._zero_upstream(upstream.role.value, upstream.url)
        self.registry.register(UpstreamCollector(upstreams, states, self._zero_upstream))  # type: ignore[arg-type]

    def _zero_upstream(self, role: str, url: str) -> None:
        if (role, url) in self._zeroed:
            return
        self._zeroed.add((role, url))
        self.ejections.labels(role, url)
        for outcome in UPSTREAM_OUTCOMES:
            self.upstream_requests.labels(role, url, outcome)

    def requests_child(self, endpoint: str, status: int) -> Any:
        """`requests.labels(endpoint, str(status))`, cached (endpoints and statuses are few)."""
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self._request_children[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        return child

    def request_duration_child(self, endpoint: str) -> Any:
        child = self._duration_children.get(endpoint)
        if child is None:
            child = self._duration_children[endpoint] = self.request_duration.labels(endpoint)
        return child

    def prefill_duration_child(self, url: str) -> Any:
        child = self._prefill_children.get(url)
        if child is None:
            child = self._prefill_children[url] = self.prefill_duration.labels(url)
        return child

    def upstream_outcome_child(self, role: str, url: str, outcome: str) -> Any:
        """`upstream_requests.labels(role, url, outcome)`, cached until forget_upstream drops the upstream."""
        key = (role, url, outcome)
        child = self._outcome_children.get(key)
        if child is None:
            child = self._outcome_children[key] = self.upstream_requests.labels(role, url, outcome)
        return child

    def watch_discovery(self, source: str) -> None:
        """The discovery source's counters, at 0 from the start."""
        self.discovery_updates.labels(source)
        self.discovery_errors.labels(source)
        for action in DISCOVERY_ACTIONS:
            self.discovery_changes.labels(source, action)

    def watch_pools(self, pools: Iterable[Any]) -> None:
        """Expose each pool's panic state at scrape time."""
        self.registry.register(PoolCollector(pools))  # type: ignore[arg-type]

    def forget_upstream(self, role: str, url: str) -> None:
        """Drop a removed upstream's series, so label sets stay bounded."""
        self._zeroed.discard((role, url))
        for key in [key for key in self._outcome_children if key[:2] == (role, url)]:
            del self._outcome_children[key]
        if role == "prefill":
            self._prefill_children.pop(url, None)
        for metric in (self.upstream_requests, self.ejections):
            for labels in list(metric._metrics):  # prometheus-client has no public way to list children
                if labels[:2] == (role, url):
                    metric.remove(*labels)
        if role == "prefill" and (url,) in self.prefill_duration._metrics:
            self.prefill_duration.remove(url)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SupervisorMetrics:
    """The `--workers` supervisor's own metrics, appended to the workers' merged exposition."""

    def __init__(self, workers: int) -> None:
        disable_created_metrics()
        self.registry = registry = CollectorRegistry()
        self.worker_up = Gauge("pdproxy_worker_up",
                               "1 if the worker answered this scrape within the per-worker timeout, else 0 "
                               "(restarting, hung or gone).", ("worker",), registry=registry)
        self.worker_restarts = Counter("pdproxy_worker_restarts",
                                       "Worker processes started again after one exited or failed to start.",
                                       ("worker",), registry=registry)
        for index in range(workers):  # every series from the start, zeros included
            self.worker_up.labels(str(index)).set(0)
            self.worker_restarts.labels(str(index))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_expositions(expositions: Mapping[str, str], label: str) -> str:
    """Several processes' text expositions as one, each sample labelled `label="<key>"`.

    The text format allows each family once, so families are merged by name: a `# HELP` or
    `# TYPE` line starts one, its samples follow it until the next.
    """
    families: dict[str, tuple[list[str], list[str]]] = {}  # name -> (comment lines, samples); insertion order
    for value, text in expositions.items():
        name = ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
            comments, samples = families.setdefault(name, ([], []))
            if line.startswith("#"):
                if line not in comments:
                    comments.append(line)
            elif line.strip():
                samples.append(_with_label(line, label, value))
    return "".join(f"{line}\n" for comments, samples in families.values() for line in (*comments, *samples))


def _with_label(sample: str, label: str, value: str) -> str:
    """`name{a="1"} 2` -> `name{label="value",a="1"} 2`; a metric name holds neither `{` nor a space."""
    end = min(i for i in (sample.find("{"), sample.find(" "), len(sample)) if i >= 0)
    name, rest = sample[:end], sample[end:].removeprefix("{}")
    if rest.startswith("{"):
        return f'{name}{{{label}="{value}",{rest[1:]}'
    return f'{name}{{{label}="{value}"}}{rest}'
