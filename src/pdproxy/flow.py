"""The PD flow: prefill on a P (with failover), hand the KV handle to a D, relay D's bytes.

Invariants:
- one parse of the client body (in `api`), one prefill call per attempt, one decode call;
- the decode request is sent as soon as the prefill answer is parsed: nothing else is
  awaited in between, because P holds the KV blocks only for a short lease;
- streamed bytes are relayed as read, never parsed, re-serialised or logged per chunk;
- every lease is released in `finally`, whatever ends the request (error, timeout,
  client gone: aiohttp cancels the handler, and the cancellation closes the upstream
  connection, which makes vLLM abort and free the request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pdproxy.balancers import Balancer
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
from pdproxy.kv import KvAdapter
from pdproxy.metrics import Metrics
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Lease, Upstream, UpstreamPool

access_log = logging.getLogger("pdproxy.access")

CLIENT_CLOSED = 499  # nginx's status for "client closed the request", for logs and metrics only
_UPSTREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)


class _NoPrompt:
    """Routing input for requests without a prompt (`/v1/models`)."""

    def prompt_prefix(self, limit: int) -> str:
        return ""


_NO_PROMPT = _NoPrompt()


@dataclass(slots=True, frozen=True)
class FlowTimeouts:
    """Seconds; see Settings for what each one bounds."""

    connect: float
    prefill: float
    stream_idle: float


@dataclass(slots=True)
class Trace:
    """What one request did, for its access-log line and metrics."""

    request_id: str
    endpoint: str
    start: float
    prefill_upstream: str = "-"
    decode_upstream: str = "-"
    status: int = 0
    prefill_s: float | None = None
    ttft_s: float | None = None
    retries: int = 0
    bytes_out: int = 0
    error: str = ""
    stage: str = "prefill"

    def log_line(self, total_s: float) -> str:
        return (
            f"{self.request_id} {self.endpoint} {self.status} P={self.prefill_upstream} "
            f"D={self.decode_upstream} prefill_ms={_ms(self.prefill_s)} ttft_ms={_ms(self.ttft_s)} "
            f"total_ms={_ms(total_s)} bytes={self.bytes_out} retries={self.retries}"
            + (f' error="{self.error}"' if self.error else "")
        )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


class PDFlow:
    """Runs one client request through prefill and decode. One instance per application."""

    def __init__(
        self,
        *,
        prefill_pool: UpstreamPool,
        decode_pool: UpstreamPool,
        prefill_policy: Balancer,
        decode_policy: Balancer,
        kv: KvAdapter,
        timeouts: FlowTimeouts,
        prefill_retries: int,
        metrics: Metrics,
        access_log_enabled: bool = True,
    ) -> None:
        self.prefill_pool = prefill_pool
        self.decode_pool = decode_pool
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.kv = kv
        self.prefill_retries = prefill_retries
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled
        self.session: aiohttp.ClientSession | None = None  # set by the app's cleanup context
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._prefill_timeout = aiohttp.ClientTimeout(total=timeouts.prefill, sock_connect=timeouts.connect)
        # No total cap on a decode: long generations are legitimate; bound the gaps instead.
        self._decode_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.stream_idle
        )

    async def wait_idle(self) -> None:
        """Return once no request is in flight (all leases released)."""
        while self.in_flight:
            await self._idle.wait()

    async def handle(self, request: web.Request, preq: ProxyRequest) -> web.StreamResponse:
        """Serve one request; errors before the first byte become OpenAI error responses."""
        trace = Trace(preq.request_id, preq.endpoint, time.perf_counter())
        self.in_flight += 1
        self._idle.clear()
        self.metrics.requests_in_flight.inc()
        try:
            response = await self._run(request, preq, trace)
            trace.status = response.status
            return response
        except ProxyError as exc:
            trace.status, trace.error = exc.status, exc.message
            if isinstance(exc, UpstreamTimeout):
                self.metrics.timeouts.labels(trace.stage).inc()
            return exc.response(preq.request_id)
        except (asyncio.CancelledError, ConnectionResetError):
            trace.status, trace.error = CLIENT_CLOSED, "client disconnected"
            self.metrics.client_disconnects.labels(trace.stage).inc()
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            self._account(trace)

    def _account(self, trace: Trace) -> None:
        total = time.perf_counter() - trace.start
        metrics = self.metrics
        metrics.requests_in_flight.dec()
        metrics.requests.labels(trace.endpoint, str(trace.status)).inc()
        metrics.request_duration.labels(trace.endpoint).observe(total)
        if trace.ttft_s is not None:
            metrics.ttft.observe(trace.ttft_s)
        if self.access_log_enabled:
            access_log.info(trace.log_line(total))

    async def _run(self, request: web.Request, preq: ProxyRequest, trace: Trace) -> web.StreamResponse:
        if not self.decode_pool.routable():  # fail before P computes KV that no D could take
            raise Unavailable("no routable decode upstream", side="decode")
        prefill_answer = await self._prefill(preq, trace)
        decode_body, has_handle = self.kv.decode_body(preq.body, prefill_answer)
        if not has_handle:
            self.metrics.kv_handoff_missing.inc()
        trace.stage = "decode"
        return await self._decode(request, preq, orjson.dumps(decode_body), trace)

    # -- prefill ---------------------------------------------------------------------------

    async def _prefill(self, preq: ProxyRequest, trace: Trace) -> dict[str, Any]:
        """Run the prefill, failing over to another P on connect errors, 5xx, garbage or timeouts."""
        body = orjson.dumps(self.kv.prefill_body(preq.body))
        tried: list[Upstream] = []
        last_error: UpstreamError | None = None
        for attempt in range(1 + self.prefill_retries):
            candidates = [u for u in self.prefill_pool.routable() if u not in tried]
            if not candidates:
                break
            upstream = self.prefill_policy.choose(candidates, preq)
            tried.append(upstream)
            trace.prefill_upstream = upstream.url
            if attempt:
                trace.retries += 1
                self.metrics.prefill_retries.inc()
            lease = Lease(upstream)
            try:
                answer = await self._call_prefill(upstream, body, preq)
            except UpstreamError as exc:
                last_error = exc
                self._report(upstream, _outcome(exc), exc)
                continue
            except UpstreamRejected as exc:
                self._report(upstream, "rejected", exc)
                raise
            except asyncio.CancelledError:
                self._report(upstream, "cancelled")
                raise
            finally:
                lease.release()
            self._report(upstream, "ok")
            trace.prefill_s = time.perf_counter() - trace.start
            return answer
        if last_error is not None:
            raise last_error
        raise Unavailable("no routable prefill upstream", side="prefill")

    async def _call_prefill(self, upstream: Upstream, body: bytes, preq: ProxyRequest) -> dict[str, Any]:
        assert self.session is not None
        started = time.perf_counter()
        try:
            async with self.session.post(
                upstream.url + preq.endpoint, data=body, headers=preq.headers, timeout=self._prefill_timeout
            ) as resp:
                payload = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "application/json")
        except _UPSTREAM_FAILURES as exc:
            raise from_client_exception(exc, side="prefill", upstream=upstream.url, stage="prefill") from exc
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

    # -- decode ----------------------------------------------------------------------------

    async def _decode(
        self, request: web.Request, preq: ProxyRequest, body: bytes, trace: Trace
    ) -> web.StreamResponse:
        assert self.session is not None
        candidates = self.decode_pool.routable()
        if not candidates:
            raise Unavailable("no routable decode upstream", side="decode")
        upstream = self.decode_policy.choose(candidates, preq)
        trace.decode_upstream = upstream.url
        lease = Lease(upstream)
        sent = time.perf_counter()
        if trace.prefill_s is not None:
            self.metrics.handoff_gap.observe(sent - trace.start - trace.prefill_s)
        error: ProxyError | None = None
        outcome = "cancelled"  # unless the call ends otherwise: the client went away
        try:
            try:
                resp = await self.session.post(
                    upstream.url + preq.endpoint, data=body, headers=preq.headers, timeout=self._decode_timeout
                )
            except _UPSTREAM_FAILURES as exc:
                raise from_client_exception(exc, side="decode", upstream=upstream.url, stage="decode") from exc
            try:
                if resp.status >= 300 or not preq.stream:
                    response = await self._decode_whole(resp, upstream, preq, trace)
                else:
                    response = await self._relay(request, resp, upstream, preq, trace)
            finally:
                resp.release()  # closes the connection unless the body was read to the end
            outcome = "broken" if trace.error else "ok"
            self.metrics.decode_duration.observe(time.perf_counter() - sent)
            return response
        except ProxyError as exc:
            error, outcome = exc, _outcome(exc)
            raise
        finally:
            lease.release()
            self._report(upstream, outcome, error)

    async def _decode_whole(
        self, resp: aiohttp.ClientResponse, upstream: Upstream, preq: ProxyRequest, trace: Trace
    ) -> web.Response:
        """A non-streamed answer (or an error status): read it all, then answer byte for byte."""
        try:
            payload = await resp.read()
        except _UPSTREAM_FAILURES as exc:
            raise from_client_exception(exc, side="decode", upstream=upstream.url, stage="decode") from exc
        content_type = resp.headers.get("Content-Type", "application/json")
        if 400 <= resp.status < 500:
            raise UpstreamRejected(resp.status, content_type, payload, upstream.url)
        if not 200 <= resp.status < 300:
            raise UpstreamBadStatus(f"decode upstream {upstream.url} answered {resp.status}",
                                    side="decode", upstream=upstream.url)
        trace.ttft_s = time.perf_counter() - trace.start
        trace.bytes_out = len(payload)
        return web.Response(status=resp.status, body=payload,
                            headers={"Content-Type": content_type, "X-Request-Id": preq.request_id})

    async def _relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        upstream: Upstream,
        preq: ProxyRequest,
        trace: Trace,
    ) -> web.StreamResponse:
        """Relay D's stream. Nothing is sent to the client before D's first byte, so a D that fails
        before it still becomes a clean 502 (and a future retry stays possible)."""
        content = resp.content
        try:
            chunk = await content.readany()
        except _UPSTREAM_FAILURES as exc:
            raise from_client_exception(exc, side="decode", upstream=upstream.url, stage="first byte") from exc
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
        sent = 0
        # From here on the client has bytes: failures end the stream with an SSE error event.
        try:
            while chunk:
                await out.write(chunk)
                sent += len(chunk)
                try:
                    chunk = await content.readany()
                except _UPSTREAM_FAILURES as exc:
                    broken = from_client_exception(exc, side="decode", upstream=upstream.url, stage="stream")
                    error = UpstreamStreamBroken(f"decode stream broke: {broken.message}",
                                                 side="decode", upstream=upstream.url)
                    trace.error = error.message
                    if isinstance(broken, UpstreamTimeout):
                        self.metrics.timeouts.labels("stream").inc()
                    await out.write(error.sse_event())
                    break
            await out.write_eof()
        finally:
            trace.bytes_out = sent
        return out

    # -- side routes ---------------------------------------------------------------------

    async def fetch_models(self, headers: dict[str, str], request_id: str) -> web.Response:
        """`GET /v1/models`, answered by a routable decode server and relayed unchanged."""
        assert self.session is not None
        candidates = self.decode_pool.routable()
        if not candidates:
            raise Unavailable("no routable decode upstream", side="decode")
        upstream = self.decode_policy.choose(candidates, _NO_PROMPT)
        lease = Lease(upstream)
        try:
            async with self.session.get(upstream.url + "/v1/models", headers=headers,
                                        timeout=self._decode_timeout) as resp:
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

    def _report(self, upstream: Upstream, outcome: str, error: ProxyError | None = None) -> None:
        """Record one upstream call's outcome (health logic will listen here)."""
        if error is not None and not isinstance(error, UpstreamRejected):
            upstream.last_error = error.message
        self.metrics.upstream_requests.labels(upstream.role.value, upstream.url, outcome).inc()


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
