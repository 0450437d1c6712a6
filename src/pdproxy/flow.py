"""The PD flow: admit, prefill on a P (with failover), hand the KV handle to a D, relay D's bytes.

Invariants:
- one parse of the client body (in `api`), one prefill call per attempt, one decode call per attempt;
- a request is admitted with its decode server already leased, so nothing is awaited between
  the prefill answer and the decode request: P holds the KV blocks only for a short lease;
- streamed bytes are relayed as read, never parsed, re-serialised or logged per chunk; the
  only per-chunk work beyond the write is one clock read for the idle watchdog;
- nothing reaches the client before D's first byte, so until then a failed decode is retried
  by running the whole flow again (fresh prefill, fresh handle: the old KV may be freed);
  after it, a failure ends the stream with an SSE error event and is never retried;
- every lease is released in `finally`, whatever ends the request (error, timeout, client
  gone: aiohttp cancels the handler, and the cancellation closes the upstream connection,
  which makes vLLM abort and free the request).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from pdproxy.admission import AdmissionQueue, QueueFull, QueueTimeout, deadline
from pdproxy.errors import (
    ProxyError,
    Unavailable,
    UpstreamBadResponse,
    UpstreamBadStatus,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
    from_client_exception,
)
from pdproxy.handoff import Handoff, Plan
from pdproxy.metrics import Metrics
from pdproxy.outlier import OutlierDetector
from pdproxy.policies import Balancer
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Lease, State, Upstream, UpstreamPool

access_log = logging.getLogger("pdproxy.access")

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "client closed the request", for logs and metrics only
RETRY_AFTER_SECONDS = 1
# A stream whose first event is an error (vLLM: its KV never arrived) failed before any token: rerun it.
SSE_ERROR_EVENT = b'data: {"error"'
INTER_CHUNK_SAMPLE_EVERY = 8  # one stream in 8 records its chunk gaps: the cost stays off most streams
_UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


class _NoPrompt:
    """Routing input for requests without a prompt (`/v1/models`)."""

    def prompt_prefix(self, limit: int) -> str:
        return ""


_NO_PROMPT = _NoPrompt()


@dataclass(slots=True, frozen=True)
class FlowTimeouts:
    """Seconds; see Settings for what each one bounds. `decode_total` 0 means no cap."""

    connect: float
    prefill: float
    prefill_deadline: float
    decode_first_byte: float
    stream_idle: float
    decode_total: float = 0.0


@dataclass(slots=True, frozen=True)
class FlowLimits:
    """Failover and overload bounds. 0 means no cap for `max_concurrency`."""

    prefill_retries: int
    flow_retries: int
    max_concurrency: int = 0


@dataclass(slots=True)
class Trace:
    """What one request did, for its access-log line and metrics."""

    request_id: str
    endpoint: str
    start: float
    client: str = "-"
    prefill_upstream: str = "-"
    decode_upstream: str = "-"
    status: int = 0
    prefill_s: float | None = None
    ttft_s: float | None = None
    retries: int = 0
    bytes_out: int = 0
    error: str = ""
    stage: str = "queue"

    def as_text(self, total_s: float) -> str:
        return (
            f"{self.request_id} {self.client} {self.endpoint} {self.status} P={self.prefill_upstream} "
            f"D={self.decode_upstream} prefill_ms={_ms(self.prefill_s)} ttft_ms={_ms(self.ttft_s)} "
            f"total_ms={_ms(total_s)} bytes={self.bytes_out} retries={self.retries}"
            + (f" error={orjson.dumps(self.error).decode()}" if self.error else "")
        )

    def as_json(self, total_s: float) -> str:
        return orjson.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "client": self.client,
            "prefill_upstream": self.prefill_upstream,
            "decode_upstream": self.decode_upstream,
            "status": self.status,
            "prefill_ms": _round_ms(self.prefill_s),
            "ttft_ms": _round_ms(self.ttft_s),
            "total_ms": _round_ms(total_s),
            "bytes_out": self.bytes_out,
            "retries": self.retries,
            "error": self.error or None,
        }).decode()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _round_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def reported_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `"usage"` object in `data`, if any.

    A byte search, not a JSON parse: it runs once per response, on the non-streamed body or
    on the final chunks of a stream (where `include_usage` puts it).
    """
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT_TOKENS.search(data, at)
    completion = _COMPLETION_TOKENS.search(data, at)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)), int(completion.group(1))


class _StreamWatchdog:
    """Closes a decode response that goes quiet for `idle` seconds, runs past `end` (loop time),
    or is cut by an operator.

    One timer per stream, re-armed lazily: a chunk costs only `self.last = loop.time()`.
    Closing the response makes the pending read fail, which the relay reports as `fired`.
    """

    __slots__ = ("_end", "_handle", "_idle", "_loop", "_resp", "fired", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop, resp: aiohttp.ClientResponse, idle: float,
                 end: float | None) -> None:
        self._loop = loop
        self._resp = resp
        self._idle = idle
        self._end = end
        self.fired: str | None = None
        self.last = loop.time()
        self._handle = loop.call_at(self._next(), self._check)

    def _next(self) -> float:
        due = self.last + self._idle
        return due if self._end is None else min(due, self._end)

    def _check(self) -> None:
        now = self._loop.time()
        if self._end is not None and now >= self._end:
            self.fired = "decode_total"
        elif now - self.last >= self._idle:
            self.fired = "stream_idle"
        else:
            self._handle = self._loop.call_at(self._next(), self._check)
            return
        self._resp.close()

    def fire(self, reason: str) -> None:
        """End the stream now, for `reason`."""
        self.fired = reason
        self._resp.close()

    def cancel(self) -> None:
        self._handle.cancel()


class PDFlow:
    """Runs one client request through prefill and decode. One instance per application."""

    def __init__(
        self,
        *,
        prefill_pool: UpstreamPool,
        decode_pool: UpstreamPool,
        prefill_policy: Balancer,
        decode_policy: Balancer,
        handoff: Handoff,
        timeouts: FlowTimeouts,
        limits: FlowLimits,
        admission: AdmissionQueue,
        outlier: OutlierDetector,
        metrics: Metrics,
        access_log: str = "text",
        on_release: Callable[[Upstream], None] | None = None,
    ) -> None:
        self.prefill_pool = prefill_pool
        self.decode_pool = decode_pool
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.handoff = handoff
        self.timeouts = timeouts
        self.limits = limits
        self.admission = admission
        self.outlier = outlier
        self.metrics = metrics
        self._log_format = {"text": Trace.as_text, "json": Trace.as_json, "off": None}[access_log]
        self._streams = 0
        self._open_streams: dict[str, set[_StreamWatchdog]] = {}  # upstream id -> its relayed streams
        self._on_release = on_release or (lambda upstream: admission.wake())
        self.session: aiohttp.ClientSession | None = None  # set by the app's cleanup context
        self.draining = False
        self.in_flight = 0  # requests in the handler, queued ones included
        self.admitted = 0  # requests holding a concurrency slot
        self._idle = asyncio.Event()
        self._idle.set()
        self._prefill_timeout = aiohttp.ClientTimeout(total=timeouts.prefill, sock_connect=timeouts.connect)
        # Decode reads are bounded by the first-byte deadline and the stream watchdog, not by aiohttp.
        self._decode_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect)
        first_byte = timeouts.decode_first_byte
        self._first_byte_timeout = min(first_byte, timeouts.decode_total) if timeouts.decode_total else first_byte

    async def wait_idle(self) -> None:
        """Return once no request is in flight (all leases released)."""
        while self.in_flight:
            await self._idle.wait()

    def cut_streams(self, upstream: Upstream, reason: str) -> int:
        """End every stream relayed from `upstream` now (each client gets an SSE error event)."""
        watchdogs = self._open_streams.pop(upstream.id, set())
        for watchdog in watchdogs:
            watchdog.fire(reason)
        return len(watchdogs)

    def start_drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.draining = True

    async def handle(self, request: web.Request, preq: ProxyRequest) -> web.StreamResponse:
        """Serve one request; errors before the first byte become OpenAI error responses."""
        trace = Trace(preq.request_id, preq.endpoint, time.perf_counter(), request.remote or "-")
        self.in_flight += 1
        self._idle.clear()
        self.metrics.requests_in_flight.inc()
        try:
            decode_lease = await self._admit(preq)
            try:
                response = await self._run(request, preq, trace, decode_lease)
            finally:
                self.admitted -= 1
                self.admission.wake()
            trace.status = response.status
            return response
        except ProxyError as exc:
            trace.status, trace.error = exc.status, exc.message
            if isinstance(exc, UpstreamTimeout):
                self.metrics.timeouts.labels(exc.stage).inc()
            return exc.response(preq.request_id)
        except (asyncio.CancelledError, ConnectionResetError):
            trace.status, trace.error = CLIENT_CLOSED, "client disconnected"
            self.metrics.client_disconnects.labels(trace.stage).inc()
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            self.metrics.requests_in_flight.dec()
            self._account(trace)

    def refuse(self, request: web.Request, endpoint: str, request_id: str, error: ProxyError) -> web.Response:
        """Answer a request refused before the flow (invalid, too large), with the same accounting."""
        trace = Trace(request_id, endpoint, time.perf_counter(), request.remote or "-", status=error.status,
                      error=error.message, stage="parse")
        self._account(trace)
        return error.response(request_id)

    def _account(self, trace: Trace) -> None:
        total = time.perf_counter() - trace.start
        metrics = self.metrics
        metrics.requests.labels(trace.endpoint, str(trace.status)).inc()
        metrics.request_duration.labels(trace.endpoint).observe(total)
        if trace.ttft_s is not None:
            metrics.ttft.observe(trace.ttft_s)
        if self._log_format is not None:
            access_log.info(self._log_format(trace, total))

    # -- admission ---------------------------------------------------------------------------

    async def _admit(self, preq: ProxyRequest) -> Lease:
        """A concurrency slot and a decode lease, at once or after waiting in the queue."""
        if self.draining:
            raise Unavailable("pdproxy is shutting down; retry on another instance",
                              retry_after=RETRY_AFTER_SECONDS)
        try:
            return await self.admission.admit(lambda: self._try_admit(preq))
        except QueueFull:
            self.metrics.queue_rejections.labels("full").inc()
            raise Unavailable("pdproxy is at capacity and its queue is full", retry_after=RETRY_AFTER_SECONDS) from None
        except QueueTimeout:
            self.metrics.queue_rejections.labels("timeout").inc()
            raise Unavailable(f"pdproxy is at capacity: no slot within {self.admission.timeout:g}s",
                              retry_after=RETRY_AFTER_SECONDS) from None

    def _try_admit(self, preq: ProxyRequest) -> Lease | None:
        """Grant a slot and lease a decode server, None when all are busy; 503 when none can serve."""
        if not self.decode_pool.routable():  # before P computes KV that no D could take
            raise Unavailable("no routable decode upstream", side="decode")
        if not self.prefill_pool.routable():
            raise Unavailable("no routable prefill upstream", side="prefill")
        if self.limits.max_concurrency and self.admitted >= self.limits.max_concurrency:
            return None
        decode = self.decode_pool.available()
        if not decode or not self.prefill_pool.available():
            return None
        self.admitted += 1
        return Lease(self.decode_policy.choose(decode, preq), self._on_release)

    # -- the flow ----------------------------------------------------------------------------

    async def _run(
        self, request: web.Request, preq: ProxyRequest, trace: Trace, decode_lease: Lease
    ) -> web.StreamResponse:
        """Prefill then decode; a decode that fails before its first byte reruns the whole flow.

        The rerun prefers another D, but falls back to the same one: a D often fails because its KV never
        arrived (P died or freed it), and a fresh prefill fixes that.
        """
        failed_decoders: list[Upstream] = []
        last_error: UpstreamError | None = None
        for attempt in range(1 + self.limits.flow_retries):
            if attempt:
                candidates = self.decode_pool.available(failed_decoders) or self.decode_pool.available()
                if not candidates:
                    break
                decode_lease = Lease(self.decode_policy.choose(candidates, preq), self._on_release)
                trace.retries += 1
                self.metrics.flow_retries.inc()
            try:
                # The decode body goes straight into _decode, which drops it once sent: held for the whole
                # stream, orjson's bytes would cost 4 KiB or more per open stream.
                return await self._decode(request, preq, await self._handoff(preq, trace, decode_lease.upstream),
                                          trace, decode_lease.upstream)
            except UpstreamError as exc:
                if exc.side != "decode" or not exc.retryable:
                    raise
                last_error = exc
                failed_decoders.append(decode_lease.upstream)
            finally:
                decode_lease.release()
        assert last_error is not None
        raise last_error

    async def _handoff(self, preq: ProxyRequest, trace: Trace, decode: Upstream) -> bytes:
        """Run the prefill; return the decode body that carries P's KV handle."""
        trace.stage = "prefill"
        plan, answer = await self._prefill(preq, trace, decode)
        call, has_handle = plan.decode(answer)
        if not has_handle:
            self.metrics.kv_handoff_missing.inc()
        trace.stage = "decode"
        return call.body

    async def _prefill(self, preq: ProxyRequest, trace: Trace, decode: Upstream) -> tuple[Plan, dict[str, Any]]:
        """Run the prefill, failing over to another P on connect errors, 5xx, garbage or timeouts."""
        tried: list[Upstream] = []
        last_error: UpstreamError | None = None
        started = time.perf_counter()
        for attempt in range(1 + self.limits.prefill_retries):
            remaining = self.timeouts.prefill_deadline - (time.perf_counter() - started)
            candidates = self.prefill_pool.available(tried)
            if not candidates or remaining <= 0:
                break
            upstream = self.prefill_policy.choose(candidates, preq)
            tried.append(upstream)
            trace.prefill_upstream = upstream.url
            if attempt:
                trace.retries += 1
                self.metrics.prefill_retries.inc()
            plan = self.handoff.plan(preq, upstream, decode)
            lease = Lease(upstream, self._on_release)
            outcome, reason = "cancelled", None  # unless the call ends otherwise: the client went away
            try:
                answer = await self._call_prefill(upstream, plan.prefill.body, preq, remaining)
                outcome = "ok"
            except UpstreamError as exc:
                last_error = exc
                outcome, reason = _outcome(exc), exc.message
                continue
            except UpstreamRejected:
                outcome = "rejected"
                raise
            finally:
                self._report(upstream, outcome, reason)  # before the release, which may remove the upstream
                lease.release()
            trace.prefill_s = time.perf_counter() - trace.start
            return plan, answer
        if last_error is not None:
            raise last_error
        raise Unavailable("no prefill upstream available", side="prefill")

    async def _call_prefill(
        self, upstream: Upstream, body: bytes, preq: ProxyRequest, remaining: float
    ) -> dict[str, Any]:
        assert self.session is not None
        timeout = self._prefill_timeout
        if remaining < self.timeouts.prefill:  # the last attempts share what is left of the deadline
            timeout = aiohttp.ClientTimeout(total=remaining, sock_connect=self.timeouts.connect)
        started = time.perf_counter()
        try:
            async with self.session.post(
                upstream.url + preq.endpoint, data=body, headers=preq.headers, timeout=timeout
            ) as resp:
                payload = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "application/json")
        except _UPSTREAM_FAILURES as exc:
            raise from_client_exception(exc, side="prefill", upstream=upstream.url, stage="prefill",
                                        timeout=timeout.total) from exc
        self.metrics.prefill_duration.labels(upstream.url).observe(time.perf_counter() - started)
        if 400 <= status < 500:
            raise UpstreamRejected(status, content_type, payload, upstream.url)
        if not 200 <= status < 300:
            raise UpstreamBadStatus(f"prefill upstream {upstream.url} answered {status}",
                                    side="prefill", upstream=upstream.url)
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamBadResponse(f"prefill upstream {upstream.url} answered with a body that is not "
                                      "a JSON object", side="prefill", upstream=upstream.url)
        return answer

    async def _decode(
        self, request: web.Request, preq: ProxyRequest, body: bytes, trace: Trace, upstream: Upstream
    ) -> web.StreamResponse:
        assert self.session is not None
        trace.decode_upstream = upstream.url
        sent = time.perf_counter()
        if trace.prefill_s is not None:
            self.metrics.handoff_gap.observe(sent - trace.start - trace.prefill_s)
        resp: aiohttp.ClientResponse | None = None
        reason: str | None = None
        outcome = "cancelled"  # unless the call ends otherwise: the client went away
        try:
            try:
                async with deadline(self._first_byte_timeout):
                    resp = await _translated(self.session.post(
                        upstream.url + preq.endpoint, data=body, headers=preq.headers, timeout=self._decode_timeout
                    ), upstream)
                    del body  # sent: not held for the whole stream
                    whole = resp.status >= 300 or not preq.stream
                    first = await _translated(resp.read() if whole else resp.content.readany(), upstream)
            except asyncio.TimeoutError:  # the deadline (aiohttp's own errors are translated inside)
                raise UpstreamTimeout(
                    f"decode upstream {upstream.url} sent no first byte within {self._first_byte_timeout:g}s",
                    side="decode", upstream=upstream.url, stage="decode_first_byte") from None
            if whole:
                response = self._answer_whole(resp, first, upstream, preq, trace)
            elif first.startswith(SSE_ERROR_EVENT):
                raise UpstreamBadStatus(f"decode upstream {upstream.url} answered with an error event: "
                                        f"{first[:300].decode(errors='replace').strip()}",
                                        side="decode", upstream=upstream.url)
            else:
                response = await self._relay(request, resp, first, upstream, preq, trace, sent)
            outcome, reason = ("broken", trace.error) if trace.error else ("ok", None)
            self.metrics.decode_duration.observe(time.perf_counter() - sent)
            return response
        except ProxyError as exc:
            outcome, reason = _outcome(exc), exc.message
            raise
        finally:
            if resp is not None:
                resp.release()  # closes the connection unless the body was read to the end
            self._report(upstream, outcome, reason)

    def _answer_whole(
        self, resp: aiohttp.ClientResponse, payload: bytes, upstream: Upstream, preq: ProxyRequest, trace: Trace
    ) -> web.Response:
        """A non-streamed answer (or an error status), byte for byte."""
        content_type = resp.headers.get("Content-Type", "application/json")
        if 400 <= resp.status < 500:
            raise UpstreamRejected(resp.status, content_type, payload, upstream.url)
        if not 200 <= resp.status < 300:
            raise UpstreamBadStatus(f"decode upstream {upstream.url} answered {resp.status}",
                                    side="decode", upstream=upstream.url)
        trace.ttft_s = time.perf_counter() - trace.start
        trace.bytes_out = len(payload)
        self._count_usage(payload)
        return web.Response(status=resp.status, body=payload,
                            headers={"Content-Type": content_type, "X-Request-Id": preq.request_id})

    async def _relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        chunk: bytes,
        upstream: Upstream,
        preq: ProxyRequest,
        trace: Trace,
        sent: float,
    ) -> web.StreamResponse:
        """Relay D's stream from its first chunk on."""
        if not chunk:
            raise UpstreamBadResponse(f"decode upstream {upstream.url} closed the stream before any data",
                                      side="decode", upstream=upstream.url)
        out = web.StreamResponse(
            status=resp.status,
            headers={
                "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
                "Cache-Control": "no-cache",
                "X-Request-Id": preq.request_id,
            },
        )
        await out.prepare(request)
        trace.ttft_s = time.perf_counter() - trace.start
        loop = asyncio.get_running_loop()
        total = self.timeouts.decode_total
        end = loop.time() - (time.perf_counter() - sent) + total if total else None
        watchdog = _StreamWatchdog(loop, resp, self.timeouts.stream_idle, end)
        open_streams = self._open_streams.setdefault(upstream.id, set())
        open_streams.add(watchdog)
        self._streams += 1
        sample_gaps = self._streams % INTER_CHUNK_SAMPLE_EVERY == 0
        inter_chunk = self.metrics.inter_token
        content = resp.content
        written = 0
        previous = last = b""
        # From here on the client has bytes: failures end the stream with an SSE error event.
        try:
            while chunk:
                await out.write(chunk)
                written += len(chunk)
                previous, last = chunk, previous
                try:
                    chunk = await content.readany()
                except _UPSTREAM_FAILURES as exc:
                    await out.write(self._broken_stream(exc, watchdog.fired, upstream, trace).sse_event())
                    break
                now = loop.time()
                if sample_gaps:
                    inter_chunk.observe(now - watchdog.last)
                watchdog.last = now
            else:
                self._count_usage(last[-256:] + previous)  # include_usage puts it in the last chunks
            await out.write_eof()
        finally:
            watchdog.cancel()
            open_streams.discard(watchdog)
            trace.bytes_out = written
        return out

    def _count_usage(self, data: bytes) -> None:
        usage = reported_usage(data)
        if usage is not None:
            self.metrics.prompt_tokens.inc(usage[0])
            self.metrics.completion_tokens.inc(usage[1])

    def _broken_stream(
        self, exc: BaseException, fired: str | None, upstream: Upstream, trace: Trace
    ) -> UpstreamStreamBroken:
        if fired in ("stream_idle", "decode_total"):
            self.metrics.timeouts.labels(fired).inc()
            limit = self.timeouts.stream_idle if fired == "stream_idle" else self.timeouts.decode_total
            cause = f"{fired.replace('_', ' ')} timeout ({limit:g}s)"
        elif fired is not None:
            cause = fired
        else:
            cause = from_client_exception(exc, side="decode", upstream=upstream.url, stage="stream").message
        error = UpstreamStreamBroken(f"decode stream broke: {cause}", side="decode", upstream=upstream.url,
                                     stage="stream")
        trace.error = error.message
        return error

    # -- side routes ---------------------------------------------------------------------

    async def fetch_models(self, headers: dict[str, str], request_id: str) -> web.Response:
        """`GET /v1/models`, answered by a routable decode server and relayed unchanged."""
        assert self.session is not None
        candidates = self.decode_pool.routable()
        if not candidates:
            raise Unavailable("no routable decode upstream", side="decode")
        upstream = self.decode_policy.choose(candidates, _NO_PROMPT)
        lease = Lease(upstream, self._on_release)
        try:
            async with deadline(self.timeouts.decode_first_byte), self.session.get(
                upstream.url + "/v1/models", headers=headers, timeout=self._decode_timeout
            ) as resp:
                payload = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "application/json")
        except _UPSTREAM_FAILURES as exc:
            raise from_client_exception(exc, side="decode", upstream=upstream.url, stage="models") from exc
        finally:
            lease.release()
        if status >= 500:
            raise UpstreamBadStatus(f"decode upstream {upstream.url} answered {status}",
                                    side="decode", upstream=upstream.url)
        return web.Response(status=status, body=payload,
                            headers={"Content-Type": content_type, "X-Request-Id": request_id})

    # -- outcomes --------------------------------------------------------------------------

    def _report(self, upstream: Upstream, outcome: str, reason: str | None = None) -> None:
        """Record one upstream call's outcome; the outlier detector decides what it means."""
        if upstream.state is State.REMOVED:  # its series are gone: recording would bring them back
            return
        self.metrics.upstream_requests.labels(upstream.role.value, upstream.url, outcome).inc()
        if outcome == "ok":
            self.outlier.report(upstream, None)
        elif outcome in _FAILURE_OUTCOMES:
            upstream.last_error = reason or outcome
            self.outlier.report(upstream, upstream.last_error)


async def _translated(call: Awaitable[T], upstream: Upstream) -> T:
    """Await a decode-side call, translating aiohttp failures into the error tree."""
    try:
        return await call
    except _UPSTREAM_FAILURES as exc:
        raise from_client_exception(exc, side="decode", upstream=upstream.url, stage="decode") from exc


def _outcome(error: ProxyError) -> str:
    """The metric label of an upstream call that ended in `error`."""
    for kind, label in _OUTCOMES:
        if isinstance(error, kind):
            return label
    return "error"


_OUTCOMES: tuple[tuple[type[ProxyError], str], ...] = (
    (UpstreamRejected, "rejected"),
    (UpstreamTimeout, "timeout"),
    (UpstreamConnectError, "connect_error"),
    (UpstreamBadStatus, "bad_status"),
    (UpstreamBadResponse, "bad_response"),
    (UpstreamStreamBroken, "broken"),
)
# Outcomes that count against an upstream (a 4xx is the client's mistake; a cancel is the client's doing).
_FAILURE_OUTCOMES = frozenset({"timeout", "connect_error", "bad_status", "bad_response", "broken"})
