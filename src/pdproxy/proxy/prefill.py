"""The prefill leg: choose a P, call it, fail over to another on the upstream's own faults, and hedge an
attempt that takes far longer than this prompt should on another P.

Hedging (see `hedge.HedgeBudget` for the delay and the budget): an attempt arms one timer at its hedge
delay. If it answers first (the common case) the timer is cancelled and nothing else happened: no task,
no second call. If the timer fires, a hedge task runs the next attempt(s) on other P while the first
keeps running; the first good answer wins and the other attempt is cancelled, reported as `hedged`
(never held against its server). A hung P is blamed only when its own attempt times out
(`prefill_timeout`), like any other attempt. Every attempt of a request, hedges included, fits in
`1 + retries` attempts and in the `deadline`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from pdproxy.client import CallError, UpstreamClient
from pdproxy.errors import CapsTaken, Unavailable, UpstreamBadResponse, UpstreamError, UpstreamRejected
from pdproxy.handoff import Handoff, Plan
from pdproxy.metrics import Metrics
from pdproxy.policies import Balancer
from pdproxy.proxy.calls import check_status, translate
from pdproxy.proxy.hedge import HedgeBudget, estimated_tokens
from pdproxy.proxy.outcomes import Report, outcome_of
from pdproxy.proxy.record import RequestRecord
from pdproxy.request import ProxyRequest
from pdproxy.tracing import PREFILL_SPAN
from pdproxy.upstreams import Lease, Upstream, UpstreamPool

RETRY_AFTER_SECONDS = 1  # every P refused the connection: the health checks will know within seconds
HEDGE_CLEANUP_WAIT = 1.0  # a cancelled hedge ends within a loop turn or two; bounded all the same

Answer = tuple[Plan, dict[str, Any]]


@dataclass(slots=True)
class _Attempts:
    """One request's prefill attempts. The hedge fields stay unset unless its hedge timer fires."""

    preq: ProxyRequest
    record: RequestRecord
    decode: Upstream
    tokens: float  # the prompt's estimated tokens; 0 when hedging is off
    started: float
    chosen: Upstream | None = None  # the P admission chose for the first attempt
    tried: list[Upstream] = field(default_factory=list)
    count: int = 0  # attempts started, hedges included
    last_error: UpstreamError | None = None
    connect_only: bool = True  # every failure so far was a failed connect (503, not 502, when all fail)
    main: asyncio.Task[Any] | None = None  # the request's task, which the hedge interrupts when it wins
    hedge: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None  # the hedge timer of the attempt running in the request's task
    hedge_due: bool = False  # the one hedge of this request was due (sent, or no other P): no other timer
    deferred: bool = False  # the hedge was due while the budget was used up (counted once as over_budget)
    decided: bool = False  # an attempt answered: the others are losers, cancelled and reported `hedged`
    won: tuple[Upstream, Plan, dict[str, Any]] | BaseException | None = None  # the hedge's answer or error
    waiting_on_hedge: bool = False  # the request's task awaits the hedge itself: do not interrupt it

    def failed(self, error: UpstreamError) -> None:
        """Keep the error the client will see: the last one, except that a P that answered badly says more
        than a P that could not be reached."""
        if error.stage != "connect":
            self.connect_only = False
            self.last_error = error
        elif self.connect_only:
            self.last_error = error


class PrefillLeg:
    """Runs the prefill of a sequential plan, with failover (`retries` more servers, all within `deadline`)
    and hedging (`hedging`; off when its budget is 0 or `retries` is 0)."""

    def __init__(self, *, pool: UpstreamPool, policy: Balancer, client: UpstreamClient, handoff: Handoff,
                 timeout: float, deadline: float, retries: int, max_answer_bytes: int, metrics: Metrics,
                 report: Report, on_release: Callable[[Upstream], None],
                 hedging: HedgeBudget | None = None) -> None:
        self.pool = pool
        self.policy = policy
        self.client = client
        self.handoff = handoff
        self.timeout = timeout
        self.deadline = deadline
        self.retries = retries
        self.max_answer_bytes = max_answer_bytes
        self.metrics = metrics
        self.hedging = hedging if hedging is not None else HedgeBudget(multiple=0, floor=0, budget=0, min_hedges=0)
        self._hedges_on = self.hedging.enabled and retries > 0
        self._report = report
        self._on_release = on_release

    async def run(self, preq: ProxyRequest, record: RequestRecord, decode: Upstream,
                  chosen: Upstream | None = None) -> Answer:
        """The plan that succeeded and P's parsed answer; the last upstream error when every try failed
        (503 + Retry-After instead when every try failed to connect).

        `chosen`: the P admission chose for the first try (leased before the next await, so its slot
        under a cap is this request's); failovers and hedges choose again."""
        attempts = _Attempts(preq, record, decode, estimated_tokens(preq) if self._hedges_on else 0.0,
                             time.perf_counter(), chosen)
        hedging = self.hedging
        hedging.prefills += 1
        try:
            return await self._run(attempts)
        finally:
            hedging.prefills -= 1
            if attempts.hedge is not None:
                await self._end_hedge(attempts)

    async def _run(self, attempts: _Attempts) -> Answer:
        record = attempts.record
        while attempts.count < 1 + self.retries:
            upstream, timeout = self._next(attempts)
            if upstream is None:
                break
            record.prefill_upstream = upstream.url
            self._arm(attempts, upstream, timeout)
            try:
                answer = await self._attempt(attempts, upstream, timeout)
            except UpstreamError:
                if attempts.hedge is None:
                    continue
                attempts.waiting_on_hedge = True  # the hedge is the rest of the failover now
                try:
                    await asyncio.wait((attempts.hedge,))
                finally:
                    attempts.waiting_on_hedge = False
                if attempts.won is None:
                    continue  # the hedge failed too: fail over on what is left, without another hedge
                return self._take(attempts)
            except UpstreamRejected:
                attempts.decided = True  # the client's mistake: a hedge still running is a loser
                raise
            except asyncio.CancelledError:
                if attempts.won is None or self._cancelled_by_client():
                    raise
                return self._take(attempts)  # the hedge answered first and interrupted this attempt
            finally:
                if attempts.timer is not None:
                    attempts.timer.cancel()
                    attempts.timer = None
            if attempts.hedge is not None:
                attempts.decided = True  # this attempt answered first: the hedge is the loser
            record.prefill_s = time.perf_counter() - record.start
            answer[0].prefill.sent()
            return answer
        if attempts.last_error is None:
            raise Unavailable("no prefill upstream available", side="prefill", retry_after=RETRY_AFTER_SECONDS)
        if attempts.connect_only:
            raise Unavailable(f"no prefill upstream reachable: {attempts.count} attempt(s) failed to connect "
                              f"(last: {attempts.last_error.message})", side="prefill",
                              retry_after=RETRY_AFTER_SECONDS)
        raise attempts.last_error

    def _pool(self, preq: ProxyRequest) -> UpstreamPool:
        """The prefill pool serving the request's model (the role pool when the orchestrator set none)."""
        return self.pool if preq.pools is None else preq.pools.prefill

    def _next(self, attempts: _Attempts) -> tuple[Upstream | None, float]:
        """The next P to try and the time its attempt may take; None when none is left or time is up."""
        remaining = self.deadline - (time.perf_counter() - attempts.started)
        chosen = attempts.chosen
        if chosen is not None:
            attempts.chosen = None
            return chosen, min(self.timeout, remaining)
        candidates = self._pool(attempts.preq).available(attempts.tried)
        if not candidates or remaining <= 0:
            return None, 0.0
        return self.policy.choose(candidates, attempts.preq), min(self.timeout, remaining)

    async def _attempt(self, attempts: _Attempts, upstream: Upstream, timeout: float, *, hedge: bool = False) -> Answer:
        """One call to `upstream`, its outcome reported and its lease released whatever ends it."""
        attempts.tried.append(upstream)
        record = attempts.record
        attempt = attempts.count
        if attempt and not hedge:
            record.retries += 1
            self.metrics.prefill_retries.inc()
        attempts.count += 1
        plan = self.handoff.plan(attempts.preq, upstream, attempts.decode)
        lease = Lease(upstream, self._on_release)
        outcome, reason = "cancelled", None  # unless the call ends otherwise: the client went away
        span = record.trace.child(PREFILL_SPAN, **{"pdproxy.upstream": upstream.url, "pdproxy.attempt": attempt,
                                                   "pdproxy.hedge": hedge})
        try:
            answer = await self._call(upstream, plan, attempts.preq, timeout, attempts.tokens, span.headers())
            outcome = "ok"
        except UpstreamError as exc:
            plan.close()
            attempts.failed(exc)
            outcome, reason = outcome_of(exc), exc.message
            raise
        except UpstreamRejected:
            plan.close()
            outcome = "rejected"
            raise
        except BaseException:
            plan.close()
            if attempts.decided:  # another attempt answered first: this one is never held against its P
                outcome = "hedged"
            raise
        finally:
            self._report(upstream, outcome, reason)  # before the release, which may remove the upstream
            lease.release()
            span.set("pdproxy.outcome", outcome)
            span.end(reason)
        return plan, answer

    # -- hedging ---------------------------------------------------------------------------------

    def _arm(self, attempts: _Attempts, upstream: Upstream, timeout: float) -> None:
        """Set the one timer of this attempt's hedge, if it may be hedged and would be before its own timeout."""
        if not self._hedges_on or attempts.hedge_due:
            return
        delay = self.hedging.delay(upstream.url, attempts.tokens)
        if delay is None or delay >= timeout:
            return
        if attempts.main is None:
            attempts.main = asyncio.current_task()
        attempts.timer = asyncio.get_running_loop().call_later(delay, self._fire, attempts)

    def _fire(self, attempts: _Attempts) -> None:
        """The hedge delay passed with no answer: start the hedge task, if the pool and the budget allow.
        Over budget, look again a floor later (the attempt still runs; its own timeout bounds the wait)."""
        attempts.timer = None
        if attempts.decided or attempts.count >= 1 + self.retries:
            attempts.hedge_due = True
            return
        if not self._pool(attempts.preq).available(attempts.tried):
            attempts.hedge_due = True
            self.metrics.prefill_hedges.labels("no_upstream").inc()
            return
        if not self.hedging.allows():
            if not attempts.deferred:
                attempts.deferred = True
                self.metrics.prefill_hedges.labels("over_budget").inc()
            attempts.timer = asyncio.get_running_loop().call_later(self.hedging.floor, self._fire, attempts)
            return
        attempts.hedge_due = True
        self.hedging.active += 1
        attempts.hedge = asyncio.get_running_loop().create_task(self._hedge(attempts))

    async def _hedge(self, attempts: _Attempts) -> None:
        """Attempts on other P beside the one still running; the first good answer interrupts the request's
        task (unless it is waiting on this one anyway), which takes the answer from `attempts.won`."""
        result = "failed"
        try:
            while not attempts.decided and attempts.count < 1 + self.retries:
                try:
                    upstream, timeout = self._next(attempts)
                except CapsTaken:  # --workers: other workers hold every other P's last slot; no hedge
                    upstream = None
                if upstream is None:
                    break
                try:
                    plan, answer = await self._attempt(attempts, upstream, timeout, hedge=True)
                except UpstreamError:
                    continue
                attempts.won, result = (upstream, plan, answer), "won"
                break
        except asyncio.CancelledError:
            result = "lost" if attempts.decided else "cancelled"
            raise
        except Exception as exc:  # a 4xx (the client's mistake) or a bug: the request's answer either way
            attempts.won, result = exc, "won"
        finally:
            self.hedging.active -= 1
            self.metrics.prefill_hedges.labels(result).inc()
        if attempts.won is not None:
            attempts.decided = True
            if not attempts.waiting_on_hedge and attempts.main is not None:
                attempts.main.cancel()  # interrupts the first attempt: it reports `hedged` and ends

    def _take(self, attempts: _Attempts) -> Answer:
        """The hedge's answer, now the request's (or its error, raised)."""
        won, attempts.won = attempts.won, None
        if isinstance(won, BaseException):
            raise won
        assert won is not None
        upstream, plan, answer = won
        record = attempts.record
        record.prefill_upstream = upstream.url
        record.prefill_s = time.perf_counter() - record.start
        plan.prefill.sent()
        return plan, answer

    @staticmethod
    def _cancelled_by_client() -> bool:
        """Whether a cancel other than the hedge's own is pending on this task (the client left too)."""
        task = asyncio.current_task()
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+; 3.10 cannot tell two cancels apart
        return uncancel is not None and uncancel() > 0

    async def _end_hedge(self, attempts: _Attempts) -> None:
        """Cancel a hedge still running and wait for it to end (its lease released, its outcome reported);
        close the plan of an answer nobody took."""
        hedge = attempts.hedge
        assert hedge is not None
        if not hedge.done():
            hedge.cancel()
            await asyncio.wait((hedge,), timeout=HEDGE_CLEANUP_WAIT)
        won, attempts.won = attempts.won, None
        if isinstance(won, tuple):
            won[1].close()

    # -- one call ----------------------------------------------------------------------------------

    async def _call(self, upstream: Upstream, plan: Plan, preq: ProxyRequest, timeout: float,
                    tokens: float, trace_headers: bytes = b"") -> dict[str, Any]:
        call = plan.prefill
        started = time.perf_counter()
        try:
            resp = await self.client.fetch(upstream.url, "POST", call.path,
                                           headers=preq.headers + call.headers + trace_headers, body=call.body,
                                           timeout=timeout, max_bytes=self.max_answer_bytes)
        except CallError as exc:
            raise translate(exc, side="prefill", upstream=upstream.url, stage="prefill", timeout=timeout) from None
        elapsed = time.perf_counter() - started
        self.metrics.prefill_duration_child(upstream.url).observe(elapsed)
        check_status(resp.status, resp.headers.get("content-type", "application/json"), resp.body, side="prefill",
                     upstream=upstream.url)
        try:
            answer = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamBadResponse(f"prefill upstream {upstream.url} answered with a body that is not "
                                      "a JSON object", side="prefill", upstream=upstream.url)
        if tokens:
            self.hedging.observe(upstream.url, tokens, elapsed)
        return answer
