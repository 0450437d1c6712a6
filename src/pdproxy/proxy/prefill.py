"""The prefill leg: choose a P, call it, fail over to another on the upstream's own faults."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from pdproxy.client import CallError, UpstreamClient
from pdproxy.errors import Unavailable, UpstreamBadResponse, UpstreamError, UpstreamRejected
from pdproxy.handoff import Handoff, Plan
from pdproxy.metrics import Metrics
from pdproxy.policies import Balancer
from pdproxy.proxy.calls import check_status, translate
from pdproxy.proxy.outcomes import Report, outcome_of
from pdproxy.proxy.record import RequestRecord
from pdproxy.request import ProxyRequest
from pdproxy.tracing import PREFILL_SPAN
from pdproxy.upstreams import Lease, Upstream, UpstreamPool


class PrefillLeg:
    """Runs the prefill of a sequential plan, with failover (`retries` more servers, all within `deadline`)."""

    def __init__(self, *, pool: UpstreamPool, policy: Balancer, client: UpstreamClient, handoff: Handoff,
                 timeout: float, deadline: float, retries: int, max_answer_bytes: int, metrics: Metrics,
                 report: Report, on_release: Callable[[Upstream], None]) -> None:
        self.pool = pool
        self.policy = policy
        self.client = client
        self.handoff = handoff
        self.timeout = timeout
        self.deadline = deadline
        self.retries = retries
        self.max_answer_bytes = max_answer_bytes
        self.metrics = metrics
        self._report = report
        self._on_release = on_release

    async def run(self, preq: ProxyRequest, record: RequestRecord, decode: Upstream,
                  chosen: Upstream | None = None) -> tuple[Plan, dict[str, Any]]:
        """The plan that succeeded and P's parsed answer; the last upstream error when every try failed.

        `chosen`: the P admission chose for the first try (leased before the next await, so its slot
        under a cap is this request's); failovers choose again."""
        tried: list[Upstream] = []
        last_error: UpstreamError | None = None
        started = time.perf_counter()
        for attempt in range(1 + self.retries):
            remaining = self.deadline - (time.perf_counter() - started)
            if chosen is not None:
                upstream, chosen = chosen, None
            else:
                candidates = self.pool.available(tried)
                if not candidates or remaining <= 0:
                    break
                upstream = self.policy.choose(candidates, preq)
            tried.append(upstream)
            record.prefill_upstream = upstream.url
            if attempt:
                record.retries += 1
                self.metrics.prefill_retries.inc()
            plan = self.handoff.plan(preq, upstream, decode)
            lease = Lease(upstream, self._on_release)
            outcome, reason = "cancelled", None  # unless the call ends otherwise: the client went away
            span = record.trace.child(PREFILL_SPAN, **{"pdproxy.upstream": upstream.url, "pdproxy.attempt": attempt})
            try:
                answer = await self._call(upstream, plan, preq, min(self.timeout, remaining), span.headers())
                outcome = "ok"
            except UpstreamError as exc:
                plan.close()
                last_error = exc
                outcome, reason = outcome_of(exc), exc.message
                continue
            except UpstreamRejected:
                plan.close()
                outcome = "rejected"
                raise
            except BaseException:
                plan.close()
                raise
            finally:
                self._report(upstream, outcome, reason)  # before the release, which may remove the upstream
                lease.release()
                span.set("pdproxy.outcome", outcome)
                span.end(reason)
            record.prefill_s = time.perf_counter() - record.start
            plan.prefill.sent()
            return plan, answer
        if last_error is not None:
            raise last_error
        raise Unavailable("no prefill upstream available", side="prefill")

    async def _call(self, upstream: Upstream, plan: Plan, preq: ProxyRequest, timeout: float,
                    trace_headers: bytes = b"") -> dict[str, Any]:
        call = plan.prefill
        started = time.perf_counter()
        try:
            resp = await self.client.fetch(upstream.url, "POST", call.path,
                                           headers=preq.headers + call.headers + trace_headers,
                                           body=call.body, timeout=timeout, max_bytes=self.max_answer_bytes)
        except CallError as exc:
            raise translate(exc, side="prefill", upstream=upstream.url, stage="prefill", timeout=timeout) from None
        self.metrics.prefill_duration_child(upstream.url).observe(time.perf_counter() - started)
        check_status(resp.status, resp.headers.get("content-type", "application/json"), resp.body, side="prefill",
                     upstream=upstream.url)
        try:
            answer = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamBadResponse(f"prefill upstream {upstream.url} answered with a body that is not "
                                      "a JSON object", side="prefill", upstream=upstream.url)
        return answer
