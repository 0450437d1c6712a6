"""Concurrent plans (SGLang bootstrap, vLLM Mooncake, NIXL push): P and D called at once, P watched
while D is relayed.

Why a separate runner: in these protocols D waits for KV that only P makes (SGLang's P even waits
for D before it answers), so the sequential flow (P first, then D) would deadlock or make D wait
for minutes. The sequential flow's hot loop stays as it is; the orchestrator picks one runner at
start-up, never per request.

Invariants of one attempt (one plan on one (P, D) pair):
- both legs are tasks started together; the handler only waits on them, so a client that goes
  away (the server cancels the handler) cancels both, and both are awaited before the attempt
  returns: their leases are back and their outcomes reported by then;
- P's answer is read (bounded by `max_answer_bytes`) and dropped once its cached-token count is taken
  (`answer_cached_tokens`): D's output is the answer, with P's count written into its usage; D's leg
  waits for that count at most `usage_grace` (see proxy/usage.py);
- each attempt's P leg has its own `pdproxy.prefill` span (as the sequential flow's), and P's call carries
  that span's `traceparent`;
- P failing before D's first byte reached the client cancels D at once (D would wait minutes for
  KV that never comes) and the request fails over to another P with a new plan (new room or
  transfer id); after D's first byte, P's failure is only reported: D already has the KV;
- D failing cancels P; a D that fails before its first byte while its P fails within
  `blame_grace` failed *because of* P: P is blamed and D's call is counted as `kv_lost` (never
  against D); otherwise D is blamed and the flow reruns on another D (`flow_retries`);
- `plan.close()` runs once both legs ended, whatever happened (it frees the bootstrap rooms).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdproxy.client import CallError
from pdproxy.errors import Unavailable, UpstreamError, UpstreamRejected
from pdproxy.handoff import Plan, UpstreamCall
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.proxy.calls import check_status, translate
from pdproxy.proxy.outcomes import FAILURE_OUTCOMES, outcome_of
from pdproxy.proxy.record import RequestRecord
from pdproxy.proxy.usage import PendingCached, answer_cached_tokens
from pdproxy.request import ProxyRequest
from pdproxy.tracing import PREFILL_SPAN
from pdproxy.upstreams import Lease, Upstream

if TYPE_CHECKING:
    from pdproxy.proxy.orchestrator import Orchestrator

#: How long a D that failed before its first byte waits for its P's verdict: in these protocols D's
#: early failure is most often P's (its bootstrap server or KV went away), and P's own socket
#: tells a moment later. A P that does not fail within it leaves the blame on D.
BLAME_GRACE = 0.25
#: How long D's usage waits for P's answer (P's cached-token count) when D gets there first. P answers once
#: the KV left it, before D's usage as a rule; past the grace D's usage goes out with D's own count.
USAGE_GRACE = 1.0


class PrefillFailed(Exception):
    """P's leg failed before D's first byte: the attempt is over and another P may be tried."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class HeldReport:
    """D's outcome, held until the attempt knows whose fault a failure was."""

    upstream: Upstream | None = None
    outcome: str = ""
    reason: str | None = None

    def __call__(self, upstream: Upstream, outcome: str, reason: str | None = None) -> None:
        self.upstream, self.outcome, self.reason = upstream, outcome, reason


class ConcurrentFlow:
    """Runs concurrent plans for one orchestrator, with the same failover budget as the sequential flow:
    `prefill_retries` other Ps within `prefill_deadline`, `flow_retries` other Ds."""

    __slots__ = ("_orch", "blame_grace", "usage_grace")

    def __init__(self, orchestrator: Orchestrator, *, blame_grace: float = BLAME_GRACE,
                 usage_grace: float = USAGE_GRACE) -> None:
        self._orch = orchestrator
        self.blame_grace = blame_grace
        self.usage_grace = usage_grace

    async def run(self, request: Request, preq: ProxyRequest, record: RequestRecord, decode_lease: Lease,
                  chosen: Upstream | None = None) -> Response | None:
        """Serve `preq` on the admitted D (`decode_lease`, released here whatever happens); `chosen` is the P
        admission chose for the first try (leased before the next await, so a cap's slot stays this request's);
        failovers choose again."""
        orch = self._orch
        limits, timeouts = orch.limits, orch.timeouts
        tried: list[Upstream] = []
        failed_decoders: list[Upstream] = []
        prefill_failures = 0
        last_error: UpstreamError | None = None
        started = time.perf_counter()
        try:
            while True:
                remaining = timeouts.prefill_deadline - (time.perf_counter() - started)
                if chosen is not None:
                    prefill, chosen = chosen, None
                else:
                    pool = orch.prefill_pool if preq.pools is None else preq.pools.prefill  # its model's
                    candidates = pool.available(tried)
                    if not candidates or remaining <= 0:
                        if last_error is not None:
                            raise last_error
                        raise Unavailable("no prefill upstream available", side="prefill")
                    prefill = orch.prefill.policy.choose(candidates, preq)
                tried.append(prefill)
                try:
                    return await self._attempt(request, preq, record, prefill, decode_lease.upstream,
                                               min(timeouts.prefill, remaining), len(tried) - 1)
                except PrefillFailed as failed:
                    last_error = failed.error
                    prefill_failures += 1
                    if prefill_failures > limits.prefill_retries:
                        raise failed.error from None
                    record.retries += 1
                    orch.metrics.prefill_retries.inc()
                except UpstreamError as exc:
                    fresh = orch.another_decoder(exc, decode_lease, failed_decoders, preq, record)
                    if fresh is None:
                        raise
                    decode_lease = fresh
                    tried, last_error, started = [], None, time.perf_counter()  # a whole new flow
        finally:
            decode_lease.release()

    async def _attempt(self, request: Request, preq: ProxyRequest, record: RequestRecord, prefill: Upstream,
                       decode: Upstream, prefill_timeout: float, attempt: int) -> Response | None:
        """One plan on (prefill, decode); PrefillFailed when P's fault ended it before D's first byte.
        `attempt`: this flow's P attempts before this one (the prefill span's `pdproxy.attempt`)."""
        orch = self._orch
        plan: Plan = orch.handoff.plan(preq, prefill, decode)
        loop = asyncio.get_running_loop()
        record.prefill_upstream = prefill.url
        record.prefill_s = None
        record.stage = "prefill"
        held = HeldReport()
        record.pending_cached = pending = PendingCached(loop.create_future(), self.usage_grace)
        p_lease = Lease(prefill, orch.on_release)  # now, before any await: P's slot is this request's
        p_leg = loop.create_task(self._prefill(preq, plan.prefill, p_lease, record, prefill_timeout, attempt,
                                               pending))
        call, _ = plan.decode(None)
        d_leg = loop.create_task(orch.run_decode(request, preq, call, record, decode, report=held))
        try:
            # Phase 1: until D ends. P's end before then is looked at once; D's first byte is `record.ttft_s`.
            await asyncio.wait((p_leg, d_leg), return_when=asyncio.FIRST_COMPLETED)
            if p_leg.done() and not d_leg.done():
                p_error = _failure(p_leg)
                if p_error is not None and record.ttft_s is None:
                    d_leg.cancel()  # D would wait for KV that never comes
                    await asyncio.wait((d_leg,))
                    self._apply(held, orch)
                    _raise_prefill(p_error)
                await asyncio.wait((d_leg,))  # P answered (or failed after D's first byte): relay D to its end
            d_error = _failure(d_leg)
            if d_error is not None and record.ttft_s is None and not isinstance(d_error, UpstreamRejected):
                if not p_leg.done():  # did D fail because P did? P's socket tells within the grace
                    await asyncio.wait((p_leg,), timeout=self.blame_grace)
                p_error = _failure(p_leg) if p_leg.done() else None
                if isinstance(p_error, UpstreamError):
                    if held.outcome in FAILURE_OUTCOMES:
                        held.outcome = "kv_lost"  # D could not get P's KV: P's fault, counted on P
                    self._apply(held, orch)
                    _raise_prefill(p_error)
            self._apply(held, orch)
            return d_leg.result()  # D's answer, or D's own error
        except asyncio.CancelledError:
            # The client went away (or the server ended the handler): both legs go; which one it was waiting on
            # is the stage the disconnect is counted at.
            record.stage = "decode" if record.ttft_s is not None or record.prefill_s is not None else "prefill"
            raise
        finally:
            for leg in (p_leg, d_leg):
                leg.cancel()  # a no-op on a leg that ended
                leg.add_done_callback(_retrieve)  # a leg's error is the attempt's to report, never the loop's
            try:
                await asyncio.wait((p_leg, d_leg))  # both end at their next wake-up: leases back, outcomes told
            finally:  # even when the handler is cancelled again meanwhile: the rooms are freed all the same
                p_lease.release()  # P's leg gave it back already, unless it was cancelled before it started
                pending.settle(None)  # likewise: nothing waits on a leg that never ran
                self._apply(held, orch)
                plan.close()

    @staticmethod
    def _apply(held: HeldReport, orch: Orchestrator) -> None:
        """Report D's held outcome once (later calls find nothing held)."""
        if held.upstream is not None:
            upstream, held.upstream = held.upstream, None
            orch.report(upstream, held.outcome, held.reason)

    async def _prefill(self, preq: ProxyRequest, call: UpstreamCall, lease: Lease, record: RequestRecord,
                       timeout: float, attempt: int, pending: PendingCached) -> None:
        """P's leg: its answer read, its cached-token count given to `pending`, the rest dropped; its outcome
        reported, its span ended, its lease given back, whatever happens."""
        orch = self._orch
        upstream = lease.upstream
        outcome, reason = "cancelled", None  # unless the call ends otherwise: the attempt ended it
        span = record.trace.child(PREFILL_SPAN, **{"pdproxy.upstream": upstream.url, "pdproxy.attempt": attempt,
                                                   "pdproxy.hedge": False})
        started = time.perf_counter()
        try:
            try:
                resp = await orch.client.fetch(upstream.url, "POST", call.path,
                                               headers=preq.headers + call.headers + span.headers(), body=call.body,
                                               timeout=timeout, max_bytes=orch.limits.max_answer_bytes)
            except CallError as exc:
                raise translate(exc, side="prefill", upstream=upstream.url, stage="prefill",
                                timeout=timeout) from None
            orch.metrics.prefill_duration_child(upstream.url).observe(time.perf_counter() - started)
            check_status(resp.status, resp.headers.get("content-type", "application/json"), resp.body,
                         side="prefill", upstream=upstream.url)
            outcome = "ok"
            record.prefill_s = time.perf_counter() - record.start
            cached = answer_cached_tokens(resp.body)
            if cached:
                orch.metrics.prefill_cached_tokens.inc(cached)
            record.prefill_cached_tokens = cached
            pending.settle(cached)
            if record.ttft_s is None:
                record.stage = "decode"  # only D is left to wait for
        except UpstreamRejected:
            outcome = "rejected"
            raise
        except UpstreamError as exc:
            outcome, reason = outcome_of(exc), exc.message
            raise
        finally:
            pending.settle(None)  # a failed or cancelled P told nothing: D's usage need not wait for it
            orch.report(upstream, outcome, reason)  # before the release, which may remove the upstream
            lease.release()
            span.set("pdproxy.outcome", outcome)
            span.end(reason)


def _retrieve(leg: asyncio.Task[Any]) -> None:
    if not leg.cancelled():
        leg.exception()


def _failure(leg: asyncio.Task[Any]) -> BaseException | None:
    """A finished leg's error (None when it succeeded; a cancelled leg is no one's failure)."""
    if leg.cancelled():
        return None
    return leg.exception()


def _raise_prefill(error: BaseException) -> None:
    """P's failure ends the attempt: an upstream fault fails over, a 4xx (the client's) is relayed."""
    if isinstance(error, UpstreamError):
        raise PrefillFailed(error)
    raise error
