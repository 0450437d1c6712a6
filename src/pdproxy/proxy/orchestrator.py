"""The orchestrator: admit a request, run its handoff plan over the prefill leg and the decode leg,
relay D's bytes, and account for it.

Invariants:
- one parse of the client body (in `api`), one prefill call per attempt, one decode call per attempt;
- a request is admitted with its decode server already leased, so nothing is awaited between the
  prefill answer and the decode request: P holds the KV blocks only for a short lease. If that D
  stopped being routable while P worked, another is leased (the NIXL pull handle names no D);
- streamed bytes are relayed as read (`relay`), never parsed, re-serialised or logged per chunk;
- nothing reaches the client before D's first byte, so until then a failed decode (connect error, 5xx,
  KV-load error: `reruns_flow`; never a timeout after D accepted it) is retried by running the whole
  flow again (fresh prefill, fresh handle: the old KV may be freed); after it, a failure ends the
  stream with an SSE error event and is never retried;
- every lease is released in `finally`, whatever ends the request (error, timeout, client gone: the
  server cancels the handler, the cancellation closes the upstream socket, and vLLM aborts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pdproxy.admission import AdmissionQueue, QueueFull, QueueTimeout
from pdproxy.client import CallError, Stream, UpstreamClient
from pdproxy.errors import (
    CapsTaken,
    ProxyError,
    Unavailable,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamKvLost,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from pdproxy.handoff import Handoff, UpstreamCall
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.metrics import Metrics
from pdproxy.outlier import OutlierDetector
from pdproxy.policies import Balancer
from pdproxy.policies.tokens import CharTokenCounter, TokenCounter
from pdproxy.proxy.calls import check_status, reruns_flow, translate
from pdproxy.proxy.concurrent import ConcurrentFlow
from pdproxy.proxy.direct import Flow, SkipPd
from pdproxy.proxy.hedge import HedgeBudget
from pdproxy.proxy.outcomes import FAILURE_OUTCOMES, Report, outcome_of
from pdproxy.proxy.prefill import PrefillLeg
from pdproxy.proxy.record import CLIENT_CLOSED, LOG_FORMATS, RequestRecord, access_log, reported_usage
from pdproxy.proxy.relay import SSE_EVENT_END, Relay
from pdproxy.proxy.usage import make_relay, prefill_cached_tokens, rewrite_cached_tokens, usage_in_stream
from pdproxy.request import ProxyRequest
from pdproxy.served_models import ModelPools, ModelTable
from pdproxy.tracing import DECODE_FIRST_BYTE_SPAN, NO_TRACE, NO_TRACING, QUEUE_SPAN, Tracing, trace_decode
from pdproxy.upstreams import Lease, Role, State, Upstream, UpstreamPool

RETRY_AFTER_SECONDS = 1
CAPS_RETRY = 0.001  # seconds before a request that lost a race for the last slots (`--workers`) looks again
# A stream whose first event is an error (vLLM: its KV never arrived) failed before any token: rerun it.
SSE_ERROR_EVENT = b'data: {"error"'
INTER_CHUNK_SAMPLE_EVERY = 8  # one stream in 8 records its chunk gaps: the cost stays off most streams

_Granted = TypeVar("_Granted")


@dataclass(slots=True, frozen=True)
class FlowTimeouts:
    """Seconds; see Settings for what each one bounds. `decode_total` 0 means no cap."""

    connect: float
    prefill: float
    prefill_deadline: float
    decode_first_byte: float
    stream_idle: float
    decode_total: float = 0.0
    decode_response: float = 600.0  # a non-streamed decode's whole answer


@dataclass(slots=True, frozen=True)
class FlowLimits:
    """Failover and overload bounds. 0 means no cap for `max_concurrency`."""

    prefill_retries: int
    flow_retries: int
    max_concurrency: int = 0
    max_answer_bytes: int = 16 * 1024 * 1024  # a whole upstream answer read into memory


class Orchestrator:
    """Runs client requests through prefill and decode. One instance per process."""

    def __init__(
        self,
        *,
        prefill_pool: UpstreamPool,
        decode_pool: UpstreamPool,
        prefill_policy: Balancer,
        decode_policy: Balancer,
        handoff: Handoff,
        client: UpstreamClient,
        timeouts: FlowTimeouts,
        limits: FlowLimits,
        admission: AdmissionQueue,
        outlier: OutlierDetector,
        metrics: Metrics,
        access_log_format: str = "text",
        on_release: Callable[[Upstream], None] | None = None,
        hedging: HedgeBudget | None = None,
        tracing: Tracing = NO_TRACING,
        pd_min_prompt_tokens: int = 0,
        token_counter: TokenCounter | None = None,
        models: ModelTable | None = None,
    ) -> None:
        self.prefill_pool = prefill_pool
        self.decode_pool = decode_pool
        self.decode_policy = decode_policy
        # Which pools serve a request's model (one model: the two pools above, looked up not at all).
        self.models = models or ModelTable({Role.PREFILL: prefill_pool, Role.DECODE: decode_pool})
        self.handoff = handoff
        self.client = client
        self.timeouts = timeouts
        self.limits = limits
        self.admission = admission
        self.outlier = outlier
        self.metrics = metrics
        self.tracing = tracing
        self._log_format = LOG_FORMATS[access_log_format]
        self._on_release = on_release or (lambda upstream: admission.wake())
        self.on_release = self._on_release
        self.prefill = PrefillLeg(
            pool=prefill_pool, policy=prefill_policy, client=client, handoff=handoff, timeout=timeouts.prefill,
            deadline=timeouts.prefill_deadline, retries=limits.prefill_retries,
            max_answer_bytes=limits.max_answer_bytes, metrics=metrics, report=self.report,
            on_release=self._on_release, hedging=hedging)
        self._streams = 0
        self._open_streams: dict[str, set[Relay]] = {}  # upstream id -> its relayed streams
        self.draining = False
        self.in_flight = 0  # requests in the handler, queued ones included
        # read at scrape time: nothing to count per request
        metrics.requests_in_flight.set_function(lambda: self.in_flight)
        self.admitted = 0  # requests holding a concurrency slot
        self._idle = asyncio.Event()
        self._idle.set()
        first_byte, whole, total = timeouts.decode_first_byte, timeouts.decode_response, timeouts.decode_total
        self._first_byte_timeout = min(first_byte, total) if total else first_byte
        self._response_timeout = min(whole, total) if total else whole
        # The flow is chosen once: a sequential plan runs `_run` with nothing added per request.
        self._flow: Flow = ConcurrentFlow(self).run if handoff.concurrent else self._run
        if pd_min_prompt_tokens:  # off by default: then no estimate is made at all
            if not handoff.decode_serves_alone:
                raise ValueError(f"--pd-min-prompt-tokens needs decode servers that serve a request alone; "
                                 f"{handoff.name}'s do not (its decode servers only take disaggregated requests)")
            self._flow = SkipPd(self, self._flow, threshold=pd_min_prompt_tokens,
                                counter=token_counter or CharTokenCounter(4.0)).run

    async def wait_idle(self) -> None:
        """Return once no request is in flight (all leases released)."""
        while self.in_flight:
            await self._idle.wait()

    def cut_streams(self, upstream: Upstream, reason: str) -> int:
        """End every stream relayed from `upstream` now (each client gets an SSE error event)."""
        relays = self._open_streams.pop(upstream.id, set())
        for relay in relays:
            relay.fire(reason)
        return len(relays)

    def streams_of(self, upstream: Upstream) -> set[Relay]:
        """The streams relayed from `upstream`, for a pass-through relay to join while it runs (and leave in
        `finally`): `cut_streams` ends them with the PD ones."""
        return self._open_streams.setdefault(upstream.id, set())

    def start_drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.draining = True

    async def handle(self, request: Request, preq: ProxyRequest) -> Response | None:
        """Serve one request; errors before the first byte become OpenAI error responses.
        None: the answer was streamed through `request`."""
        record = RequestRecord(preq.request_id, preq.endpoint, time.perf_counter(), request.remote or "-")
        if self.tracing.enabled:
            parent = getattr(request, "trace", None)  # a fan-out's sub-flow hangs under the whole request's span
            record.trace = parent.flow(preq.request_id, request.index) if parent is not None else self.tracing.start(
                preq.request_id, preq.endpoint, request.headers.get("traceparent"), request.headers.get("tracestate"))
        self.enter()
        try:
            single = self.models.single
            preq.pools = single if single is not None else self.models.resolve(preq.body.get("model"))
            decode_lease, prefill = await self.wait_admitted(record, self._admit(preq))
            try:
                response = await self._flow(request, preq, record, decode_lease, prefill)
            finally:
                self.admitted -= 1
                self.admission.wake()
            if response is not None:
                record.status = response.status
            return response
        except ProxyError as exc:
            return self.answer_error(exc, record, preq.request_id)
        except asyncio.CancelledError:
            record.status, record.error = CLIENT_CLOSED, "client disconnected"
            self.metrics.client_disconnects.labels(record.stage).inc()
            raise
        finally:
            self.leave()
            record.trace.end(record.status, record.error or None)
            self.account(record)

    @staticmethod
    async def wait_admitted(record: RequestRecord, admit: Awaitable[_Granted]) -> _Granted:
        """`admit` (the request's wait for a slot) awaited inside the request's queue span."""
        span = record.trace.child(QUEUE_SPAN)
        try:
            granted = await admit
        except BaseException as exc:
            span.end(getattr(exc, "message", None) or type(exc).__name__)
            raise
        span.end()
        return granted

    def enter(self) -> None:
        """A request entered a handler (PD or pass-through): drain waits for it until `leave()`."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    def refuse(self, request: Request, endpoint: str, request_id: str, error: ProxyError) -> Response:
        """Answer a request refused before the flow (invalid, too large), with the same accounting."""
        record = RequestRecord(request_id, endpoint, time.perf_counter(), request.remote or "-", status=error.status,
                               error=error.message, stage="parse")
        self.account(record)
        return error.response(request_id)

    def account(self, record: RequestRecord, *, metrics: bool = True) -> None:
        """One request's metrics (unless `metrics` is False: a refusal counted elsewhere) and access-log line."""
        total = time.perf_counter() - record.start
        if metrics:
            self.metrics.requests_child(record.endpoint, record.status).inc()
            self.metrics.request_duration_child(record.endpoint).observe(total)
            if record.ttft_s is not None:
                self.metrics.ttft.observe(record.ttft_s)
        if self._log_format is not None:
            access_log.info(self._log_format(record, total))

    # -- admission ---------------------------------------------------------------------------

    async def _admit(self, preq: ProxyRequest) -> tuple[Lease, Upstream]:
        """A concurrency slot, a decode lease and the chosen P, at once or after waiting in the queue."""
        return await self._queue(lambda: self._try_admit(preq), preq.pools)  # a line per model

    async def admit_slot(self, pool: UpstreamPool | None) -> None:
        """A pass-through request's concurrency slot (under the same `max_concurrency`, queue, queue timeout and
        503s as a PD request), at once or after waiting in `pool`'s line until `pool` has an available upstream;
        503 at once when `pool` has no routable one. None for `pool`: a slot only (the request names its
        upstream). The caller gives it back with `release_slot()`."""
        await self._queue(lambda: self._try_slot(pool), pool)

    def release_slot(self) -> None:
        self.admitted -= 1
        self.admission.wake()

    async def _queue(self, try_admit: Callable[[], _Granted | None], line: object) -> _Granted:
        """What `try_admit` grants, waiting in `line` (FIFO, bounded) when it grants nothing now; 503 when
        draining, when the queue is full or when the wait passes the queue timeout."""
        if self.draining:
            raise Unavailable("pdproxy is shutting down; retry on another instance",
                              retry_after=RETRY_AFTER_SECONDS)
        try:
            return await self.admission.admit(try_admit, line)
        except QueueFull:
            self.metrics.queue_rejections.labels("full").inc()
            raise Unavailable("pdproxy is at capacity and its queue is full", retry_after=RETRY_AFTER_SECONDS) from None
        except QueueTimeout:
            self.metrics.queue_rejections.labels("timeout").inc()
            raise Unavailable(f"pdproxy is at capacity: no slot within {self.admission.timeout:g}s",
                              retry_after=RETRY_AFTER_SECONDS) from None

    def answer_error(self, exc: ProxyError, record: RequestRecord, request_id: str) -> Response:
        """A request's failure as its answer, recorded and counted (pass-through routes share it)."""
        record.status, record.error = exc.status, exc.message
        if isinstance(exc, UpstreamTimeout):
            self.metrics.timeouts.labels(exc.stage).inc()
        return exc.response(request_id)

    def _try_slot(self, pool: UpstreamPool | None) -> bool | None:
        """A slot for a pass-through request whose `pool` has an upstream free now (None when not yet); 503
        when `pool` has none that could serve."""
        if pool is not None and not pool.available():
            if not pool.routable():
                raise Unavailable(f"no routable {pool.role.value} upstream", side=pool.role.value,
                                  retry_after=RETRY_AFTER_SECONDS)
            return None
        if self.limits.max_concurrency and self.admitted >= self.limits.max_concurrency:
            return None
        self.admitted += 1
        return True

    def _try_admit(self, preq: ProxyRequest) -> tuple[Lease, Upstream] | None:
        """Grant a slot, lease a decode server and choose the prefill one, None when all are busy; 503 when
        none can serve. P is chosen here, not when the prefill starts, so a cap counted over the workers
        holds it from the admission on (another worker cannot take it in between)."""
        # An available upstream is a routable one: the routable() scans run only when none is available.
        pools = _pools(preq)
        decode = pools.decode.available()
        if not decode and not pools.decode.routable():  # before P computes KV that no D could take
            raise Unavailable(f"no routable decode upstream{_for_model(pools)}", side="decode",
                              retry_after=RETRY_AFTER_SECONDS)
        prefill = pools.prefill.available()
        if not prefill and not pools.prefill.routable():
            raise Unavailable(f"no routable prefill upstream{_for_model(pools)}", side="prefill",
                              retry_after=RETRY_AFTER_SECONDS)
        if self.limits.max_concurrency and self.admitted >= self.limits.max_concurrency:
            return None
        if not decode or not prefill:
            return None
        try:
            decoder = self.decode_policy.choose(decode, preq)
            prefiller = self.prefill.policy.choose(prefill, preq)
        except CapsTaken:
            # Other workers took the last slots in this instant (their reservations are withdrawn or
            # leased by now): wait for a release, or a moment when both sides lost the race.
            asyncio.get_running_loop().call_later(CAPS_RETRY, self.admission.wake)
            return None
        self.admitted += 1
        return Lease(decoder, self._on_release), prefiller

    # -- the flow ----------------------------------------------------------------------------

    async def _run(
        self, request: Request, preq: ProxyRequest, record: RequestRecord, decode_lease: Lease, prefill: Upstream
    ) -> Response | None:
        """Prefill then decode; a decode that fails before its first byte reruns the whole flow.

        The rerun prefers another D, but falls back to the same one: a D often fails because its KV never
        arrived (P died or freed it), and a fresh prefill fixes that.
        """
        failed_decoders: list[Upstream] = []
        last_error: UpstreamError | None = None
        for attempt in range(1 + self.limits.flow_retries):
            if attempt:
                pool = _pools(preq).decode
                candidates = pool.available(failed_decoders) or pool.available()
                if not candidates:
                    break
                decode_lease = Lease(self.decode_policy.choose(candidates, preq), self._on_release)
                record.retries += 1
                self.metrics.flow_retries.inc()
            try:
                record.stage = "prefill"
                plan, answer = await self.prefill.run(preq, record, decode_lease.upstream,
                                                      prefill if not attempt else None)
                try:
                    decode_lease = self._recheck(decode_lease, preq)
                    call, has_handle = plan.decode(answer)
                    cached = prefill_cached_tokens(answer)
                    if cached:
                        self.metrics.prefill_cached_tokens.inc(cached)
                    record.prefill_cached_tokens = cached if has_handle else None  # D's own count is true
                    del answer  # freed before the stream: only D's call is needed now
                    if not has_handle:
                        self.metrics.kv_handoff_missing.inc()
                    record.stage = "decode"
                    return await self._decode(request, preq, call, record, decode_lease.upstream)
                finally:
                    plan.close()
            except UpstreamError as exc:
                if exc.side != "decode" or not reruns_flow(exc):
                    raise
                last_error = exc
                failed_decoders.append(decode_lease.upstream)
            finally:
                decode_lease.release()
        assert last_error is not None
        raise last_error

    def another_decoder(self, error: UpstreamError, lease: Lease, failed: list[Upstream], preq: ProxyRequest,
                        record: RequestRecord) -> Lease | None:
        """After `lease`'s D failed before its first byte with `error`: a lease on a D not in `failed` (any routable
        one when all failed: a fresh attempt may fix what failed), counted as a flow retry, `lease` released; None
        when `error` does not rerun a flow (`reruns_flow`), `flow_retries` are spent or no D is available."""
        if error.side != "decode" or not reruns_flow(error) or len(failed) >= self.limits.flow_retries:
            return None
        failed.append(lease.upstream)
        pool = _pools(preq).decode
        candidates = pool.available(failed) or pool.available()
        if not candidates:
            return None
        lease.release()
        record.retries += 1
        self.metrics.flow_retries.inc()
        return Lease(self.decode_policy.choose(candidates, preq), self._on_release)

    def _recheck(self, lease: Lease, preq: ProxyRequest) -> Lease:
        """The D leased at admission, or another when it stopped being routable while P worked."""
        pool = _pools(preq).decode
        if pool.may_route(lease.upstream):  # healthy, or the pool is in panic
            return lease
        candidates = pool.available()
        if not candidates:
            return lease  # nothing better: the decode fails or succeeds on its own
        fresh = Lease(self.decode_policy.choose(candidates, preq), self._on_release)
        lease.release()
        return fresh

    def run_decode(self, request: Request, preq: ProxyRequest, call: UpstreamCall, record: RequestRecord,
                   upstream: Upstream, *, report: Report) -> Awaitable[Response | None]:
        """The decode leg, its outcome told to `report` instead of reported (a concurrent plan decides whose
        fault a failure was once both legs are known)."""
        return self._decode(request, preq, call, record, upstream, report)

    async def _decode(
        self, request: Request, preq: ProxyRequest, call: UpstreamCall, record: RequestRecord, upstream: Upstream,
        report: Report | None = None,
    ) -> Response | None:
        record.decode_upstream = upstream.url
        sent = time.perf_counter()
        if record.prefill_s is not None:
            self.metrics.handoff_gap.observe(sent - record.start - record.prefill_s)
        reason: str | None = None
        outcome = "cancelled"  # unless the call ends otherwise: the client went away
        leg = record.trace.child(DECODE_FIRST_BYTE_SPAN, **{"pdproxy.upstream": upstream.url})
        call.headers += leg.headers()  # D's spans hang under this leg's (nothing when tracing is off)
        try:
            if preq.stream:
                response = await self._decode_stream(request, preq, call, record, upstream, sent)
            else:
                response = await self._decode_whole(preq, call, record, upstream)
            outcome, reason = ("broken", record.error) if record.error else ("ok", None)
            self.metrics.decode_duration.observe(time.perf_counter() - sent)
            return response
        except UpstreamKvLost as exc:  # P's fault: counted against P, and D's call gets its own outcome
            outcome, reason = "kv_lost", exc.message
            prefill = _pools(preq).prefill.find(exc.blamed)
            if prefill is not None:
                self.report(prefill, "kv_lost", exc.message)
            raise
        except ProxyError as exc:
            outcome, reason = outcome_of(exc), exc.message
            raise
        finally:
            (report or self.report)(upstream, outcome, reason)
            if record.trace is not NO_TRACE:
                trace_decode(record, leg, preq.stream, outcome, reason)

    async def _decode_whole(
        self, preq: ProxyRequest, call: UpstreamCall, record: RequestRecord, upstream: Upstream
    ) -> Response:
        """A non-streamed answer (or an error status), byte for byte."""
        timeout = self._response_timeout
        try:
            resp = await self.client.fetch(upstream.url, "POST", call.path, headers=preq.headers + call.headers,
                                           body=call.body, timeout=timeout, max_bytes=self.limits.max_answer_bytes)
        except CallError as exc:
            raise translate(exc, side="decode", upstream=upstream.url, stage="decode_response",
                            timeout=timeout) from None
        content_type = resp.headers.get("content-type", "application/json")
        check_status(resp.status, content_type, resp.body, side="decode", upstream=upstream.url)
        record.ttft_s = time.perf_counter() - record.start
        body = resp.body
        if record.pending_cached is not None:  # a concurrent plan: P's count, once P answered (bounded)
            record.prefill_cached_tokens = await record.pending_cached.wait()
        if record.prefill_cached_tokens is not None:  # P's cache, not D's transfer
            body = rewrite_cached_tokens(body, b"%d" % record.prefill_cached_tokens)[0]
        record.bytes_out = len(body)
        self._count_usage(body)
        return Response(status=resp.status, body=body, content_type=content_type,
                        headers=(("X-Request-Id", preq.request_id),))

    async def _open(self, preq: ProxyRequest, call: UpstreamCall, upstream: Upstream) -> Stream:
        try:
            stream = await self.client.open(upstream.url, "POST", call.path, headers=preq.headers + call.headers,
                                            body=call.body, first_byte_timeout=self._first_byte_timeout,
                                            idle_timeout=self.timeouts.stream_idle)
        except CallError as exc:
            stage = "decode_first_byte" if exc.kind == "first_byte_timeout" else "decode"
            error = translate(exc, side="decode", upstream=upstream.url, stage=stage)
            if stage == "decode_first_byte":
                error = UpstreamTimeout(f"decode upstream {upstream.url} sent no first byte within "
                                        f"{self._first_byte_timeout:g}s", side="decode", upstream=upstream.url,
                                        stage=stage)
            raise error from None
        call.sent()  # answered: no re-send can need the body any more
        if 200 <= stream.status < 300:
            return stream
        try:  # an error status: its whole (small) body, within what is left of the first-byte deadline
            payload = stream.first + await asyncio.wait_for(stream.read_rest(self.limits.max_answer_bytes),
                                                            self._first_byte_timeout)
        except (CallError, asyncio.TimeoutError):
            payload = stream.first
        finally:
            stream.abort()
        check_status(stream.status, stream.headers.get("content-type", "application/json"), payload,
                     side="decode", upstream=upstream.url)
        raise AssertionError("unreachable: check_status raises for every non-2xx status")

    async def _decode_stream(
        self, request: Request, preq: ProxyRequest, call: UpstreamCall, record: RequestRecord, upstream: Upstream,
        sent: float,
    ) -> Response | None:
        """Relay D's stream from its first chunk on."""
        stream = await self._open(preq, call, upstream)
        relay: Relay | None = None
        try:
            first = stream.first
            if not first:
                raise UpstreamBadResponse(f"decode upstream {upstream.url} closed the stream before any data",
                                          side="decode", upstream=upstream.url)
            if first.startswith(SSE_ERROR_EVENT):  # vLLM: D could not load the KV blocks P made (P died or freed)
                raise UpstreamKvLost(f"decode upstream {upstream.url} answered with an error event before any "
                                     f"token: {first[:300].decode(errors='replace').strip()}",
                                     upstream=upstream.url, blamed=record.prefill_upstream)
            out = request.start_stream(stream.status, (
                ("Content-Type", stream.headers.get("content-type", "text/event-stream")),
                ("Cache-Control", "no-cache"),
                ("X-Request-Id", preq.request_id),
            ))
            record.status = stream.status
            record.ttft_s = time.perf_counter() - record.start
            loop = asyncio.get_running_loop()
            total = self.timeouts.decode_total
            end = loop.time() - (time.perf_counter() - sent) + total if total else None
            self._streams += 1
            gaps = self.metrics.inter_token if self._streams % INTER_CHUNK_SAMPLE_EVERY == 0 else None
            cached, pending = ((record.prefill_cached_tokens, record.pending_cached) if usage_in_stream(preq.body)
                               else (None, None))
            relay = make_relay(loop, stream, out, end=end, gaps=gaps, cached=cached, pending=pending)
            open_streams = self._open_streams.setdefault(upstream.id, set())
            open_streams.add(relay)
            # From here on the client has bytes: failures end the stream with an SSE error event.
            try:
                relay.begin(first)
                ended = await relay.done
            finally:
                open_streams.discard(relay)
                record.bytes_out = relay.bytes
            if ended is None:
                self._count_usage(relay.tail)
            else:
                error = self._broken_stream(ended, upstream, record)
                out.write((b"" if relay.on_event_boundary else SSE_EVENT_END) + error.sse_event())
            out.end()
            return None
        finally:
            if relay is not None:
                relay.close()
            else:
                stream.abort()

    def _count_usage(self, data: bytes) -> None:
        usage = reported_usage(data)
        if usage is not None:
            self.metrics.prompt_tokens.inc(usage[0])
            self.metrics.completion_tokens.inc(usage[1])

    def _broken_stream(self, ended: CallError | str, upstream: Upstream, record: RequestRecord) -> UpstreamStreamBroken:
        if ended in ("stream_idle", "decode_total") or (isinstance(ended, CallError) and ended.kind == "idle_timeout"):
            fired = "stream_idle" if isinstance(ended, CallError) else ended
            self.metrics.timeouts.labels(fired).inc()
            limit = self.timeouts.stream_idle if fired == "stream_idle" else self.timeouts.decode_total
            cause = f"{fired.replace('_', ' ')} timeout ({limit:g}s)"
        elif isinstance(ended, str):
            cause = ended
        else:
            cause = translate(ended, side="decode", upstream=upstream.url, stage="stream").message
        error = UpstreamStreamBroken(f"decode stream broke: {cause}", side="decode", upstream=upstream.url,
                                     stage="stream")
        record.error = error.message
        return error

    # -- outcomes --------------------------------------------------------------------------

    def report(self, upstream: Upstream, outcome: str, reason: str | None = None) -> None:
        """Record one upstream call's outcome; the outlier detector decides what it means. A lost KV counts
        against the P that made it, never against the D that could not load it."""
        if upstream.state is State.REMOVED:  # its series are gone: recording would bring them back
            return
        self.metrics.upstream_outcome_child(upstream.role.value, upstream.url, outcome).inc()
        if outcome == "ok":
            self.outlier.report(upstream, None)
        elif outcome in FAILURE_OUTCOMES or (outcome == "kv_lost" and upstream.role is Role.PREFILL):
            upstream.last_error = reason or outcome
            self.outlier.report(upstream, upstream.last_error)


def _pools(preq: ProxyRequest) -> ModelPools:
    """The pools `handle` resolved for this request's model (always set before admission)."""
    assert preq.pools is not None, "handle() resolves a request's pools before anything routes it"
    return preq.pools


def _for_model(pools: ModelPools) -> str:
    return "" if pools.model is None else f" for model `{pools.model}`"
