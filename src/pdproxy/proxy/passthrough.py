"""Pass-through routes: a request forwarded byte for byte to one routable server of a pool (embeddings,
tokenizer, Responses, Messages, `/v1/models`...), and its answer back unchanged, whole or streamed.

Invariants:
- the client's body is never parsed here: the bytes go upstream as they came;
- failover happens only before anything reached the client, and only for faults that cannot have run
  the request (connect errors) or that the server owned (5xx): a timeout is not retried, the request
  may be running;
- an answer whose Content-Type is `text/event-stream` is relayed as read (`Relay`), anything else is
  read whole (bounded by `max_answer_bytes`) and sent in one response;
- every lease is released in `finally`, and every request is counted in the orchestrator's in-flight
  count (so drain waits for it) and gets one access-log line and its metrics there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdproxy.client import CallError, Stream, UpstreamClient
from pdproxy.errors import (
    ProxyError,
    Unavailable,
    UpstreamBadStatus,
    UpstreamError,
    UpstreamStreamBroken,
)
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.policies import Balancer
from pdproxy.proxy.calls import check_status, translate
from pdproxy.proxy.orchestrator import RETRY_AFTER_SECONDS, Orchestrator
from pdproxy.proxy.outcomes import outcome_of
from pdproxy.proxy.record import CLIENT_CLOSED, RequestRecord
from pdproxy.proxy.relay import SSE_EVENT_END, Relay
from pdproxy.served_models import ModelPools
from pdproxy.tracing import UPSTREAM_SPAN
from pdproxy.upstreams import Lease, Role, Upstream, UpstreamPool

EVENT_STREAM = "text/event-stream"
# Answer headers worth relaying besides Content-Type (the engine's own request id stays ours).
_RELAYED_HEADERS = ("cache-control",)


class _NoPrompt:
    """Routing input for requests the proxy does not parse."""

    def prompt_prefix(self, limit: int) -> str:
        return ""


_NO_PROMPT = _NoPrompt()


@dataclass(slots=True, frozen=True)
class PassTimeouts:
    """Seconds: until the answer's head and first bytes, between two reads of its body, and in all (0: no cap)."""

    first_byte: float
    idle: float
    total: float = 0.0


@dataclass(slots=True, frozen=True)
class Route:
    """A pass-through route: its metric/log label (the pattern, never a path with ids), the pool it goes to, and
    whether it takes an admission slot (`admitted`: the engine works for it; off for metadata reads and
    cancels, which must not wait behind the load)."""

    label: str
    role: Role
    admitted: bool = True


#: Called with the upstream that answered 2xx and the answer's first bytes (the Responses API learns ids here).
OnAnswer = Callable[[Upstream, bytes], None]


class Passthrough:
    """Forwards requests to the prefill or the decode pool, with the orchestrator's health, leases, failover
    rules, timeouts and accounting."""

    def __init__(self, *, flow: Orchestrator, policies: dict[Role, Balancer], client: UpstreamClient,
                 timeouts: PassTimeouts, retries: int, max_answer_bytes: int,
                 on_release: Callable[[Upstream], None]) -> None:
        self.flow = flow
        self.pools: dict[Role, UpstreamPool] = {Role.PREFILL: flow.prefill_pool, Role.DECODE: flow.decode_pool}
        self.policies = policies
        self.client = client
        self.timeouts = timeouts
        self.retries = retries
        self.max_answer_bytes = max_answer_bytes
        self._on_release = on_release

    async def handle(self, request: Request, route: Route, path: str, headers: bytes, request_id: str, *,
                     targets: Sequence[Upstream] | None = None, next_on_404: bool = False,
                     on_answer: OnAnswer | None = None, pools: ModelPools | None = None) -> Response | None:
        """Serve one request; None when the answer was streamed through `request`.

        `targets`: these upstreams in this order instead of the pool's choice (a Responses-API id's home);
        `next_on_404`: a 404 from one of them moves on to the next (an id asked around the pool);
        `pools`: the pools of the request's model (several served), instead of the role pools."""
        flow = self.flow
        record = RequestRecord(request_id, route.label, time.perf_counter(), request.remote or "-", stage="upstream")
        if flow.tracing.enabled:
            record.trace = flow.tracing.start(request_id, route.label, request.headers.get("traceparent"),
                                              request.headers.get("tracestate"))
        flow.enter()
        slot = False  # a concurrency slot held, given back in `finally`
        try:
            if route.admitted:  # the same slots, queue and 503s as a PD request
                record.stage = "queue"
                await flow.wait_admitted(record, flow.admit_slot(None if targets is not None
                                                                 else self._pool(route, pools)))
                slot = True
                record.stage = "upstream"
            elif flow.draining:
                raise Unavailable("pdproxy is shutting down; retry on another instance",
                                  retry_after=RETRY_AFTER_SECONDS)
            response = await self._forward(request, route, path, headers, record, targets, next_on_404, on_answer,
                                           pools)
            if response is not None:
                record.status = response.status
            return response
        except ProxyError as exc:
            return flow.answer_error(exc, record, request_id)
        except asyncio.CancelledError:
            record.status, record.error = CLIENT_CLOSED, "client disconnected"
            flow.metrics.client_disconnects.labels("queue" if record.stage == "queue" else "decode").inc()
            raise
        finally:
            if slot:
                flow.release_slot()
            flow.leave()
            record.trace.end(record.status, record.error or None)
            flow.account(record)

    async def _forward(self, request: Request, route: Route, path: str, headers: bytes, record: RequestRecord,
                       targets: Sequence[Upstream] | None, next_on_404: bool,
                       on_answer: OnAnswer | None, pools: ModelPools | None) -> Response | None:
        pool, policy = self._pool(route, pools), self.policies[route.role]
        side = route.role.value
        tried: list[Upstream] = []
        last_error: UpstreamError | None = None
        attempts = len(targets) if targets is not None else 1 + self.retries
        for attempt in range(attempts):
            if targets is not None:
                upstream = targets[attempt]
            else:
                candidates = pool.available(tried)
                if not candidates:
                    break
                upstream = policy.choose(candidates, _NO_PROMPT)
            tried.append(upstream)
            if route.role is Role.PREFILL:
                record.prefill_upstream = upstream.url
            else:
                record.decode_upstream = upstream.url
            if attempt:
                record.retries += 1
            lease = Lease(upstream, self._on_release)
            outcome, reason = "cancelled", None  # unless the call ends otherwise: the client went away
            span = record.trace.child(UPSTREAM_SPAN, **{"pdproxy.upstream": upstream.url, "pdproxy.attempt": attempt})
            try:
                stream = await self._open(upstream, request.method, path, headers + span.headers(), request.body,
                                          side)
                status = stream.status
                last = attempt == attempts - 1
                if status >= 500 and not last:  # the server's own fault, before any byte went out: next one
                    stream.abort()
                    last_error = UpstreamBadStatus(f"{side} upstream {upstream.url} answered {status}",
                                                   side=side, upstream=upstream.url)
                    outcome, reason = "bad_status", last_error.message
                    continue
                if status == 404 and next_on_404 and not last:
                    stream.abort()
                    outcome = "rejected"
                    continue
                if 200 <= status < 300 and on_answer is not None:
                    on_answer(upstream, stream.first)
                if stream.headers.get("content-type", "").startswith(EVENT_STREAM) and 200 <= status < 300:
                    request.body = b""  # no attempt follows a stream: the body is not held while it runs
                    outcome = "ok"
                    broken = await self._relay(request, stream, record, upstream, side)
                    if broken is not None:
                        outcome, reason = "broken", broken
                    return None
                response = await self._whole(stream, record, upstream, side)
                outcome = "ok" if status < 400 else "rejected"
                return response
            except UpstreamError as exc:
                outcome, reason = outcome_of(exc), exc.message
                if exc.stage != "connect":  # it may have run: a timeout or a broken answer is not re-sent
                    raise
                last_error = exc
            except ProxyError as exc:
                outcome, reason = outcome_of(exc), exc.message
                raise
            finally:
                self.flow.report(upstream, outcome, reason)  # before the release, which may remove the upstream
                lease.release()
                span.set("pdproxy.outcome", outcome)
                span.end(reason)
        if last_error is not None:
            raise last_error
        raise Unavailable(f"no routable {side} upstream", side=side)

    def _pool(self, route: Route, pools: ModelPools | None) -> UpstreamPool:
        """The pool `route` goes to: its role's, of the request's model when several are served."""
        if pools is None:
            return self.pools[route.role]
        return pools.prefill if route.role is Role.PREFILL else pools.decode

    async def _open(self, upstream: Upstream, method: str, path: str, headers: bytes, body: bytes,
                    side: str) -> Stream:
        try:
            return await self.client.open(upstream.url, method, path, headers=headers, body=body,
                                          first_byte_timeout=self.timeouts.first_byte,
                                          idle_timeout=self.timeouts.idle)
        except CallError as exc:
            stage = "decode_first_byte" if exc.kind == "first_byte_timeout" else path.strip("/").replace("/", "_")
            raise translate(exc, side=side, upstream=upstream.url, stage=stage,
                            timeout=self.timeouts.first_byte) from None

    async def _whole(self, stream: Stream, record: RequestRecord, upstream: Upstream, side: str) -> Response:
        """A whole answer (JSON, an error status), byte for byte."""
        try:
            rest = b"" if stream.complete else await stream.read_rest(self.max_answer_bytes)
        except CallError as exc:
            raise translate(exc, side=side, upstream=upstream.url, stage="upstream_body") from None
        finally:
            stream.abort()  # a no-op once the message ended (the connection is back in the pool)
        body = stream.first + rest if rest else stream.first
        content_type = stream.headers.get("content-type", "application/json")
        if not 400 <= stream.status < 500:
            check_status(stream.status, content_type, body, side=side, upstream=upstream.url)
        record.ttft_s = time.perf_counter() - record.start
        record.bytes_out = len(body)
        extra = tuple((name.title(), stream.headers[name]) for name in _RELAYED_HEADERS if name in stream.headers)
        return Response(status=stream.status, body=body, content_type=content_type,
                        headers=(("X-Request-Id", record.request_id), *extra))

    async def _relay(self, request: Request, stream: Stream, record: RequestRecord, upstream: Upstream,
                     side: str) -> str | None:
        """Relay a streamed answer from its first bytes on; the reason it broke, or None."""
        out = request.start_stream(stream.status, (
            ("Content-Type", stream.headers.get("content-type", EVENT_STREAM)),
            ("Cache-Control", "no-cache"),
            ("X-Request-Id", record.request_id),
        ))
        record.status = stream.status
        record.ttft_s = time.perf_counter() - record.start
        loop = asyncio.get_running_loop()
        total = self.timeouts.total
        relay = Relay(loop, stream, out, end=loop.time() + total if total else None, gaps=None)
        open_streams = self.flow.streams_of(upstream)  # an operator's forced removal cuts it
        open_streams.add(relay)
        # From here on the client has bytes: a failure ends the stream with an SSE error event.
        try:
            relay.begin(stream.first)
            ended = await relay.done
            open_streams.discard(relay)
            record.bytes_out = relay.bytes
            if ended is not None:
                if isinstance(ended, CallError):
                    cause = translate(ended, side=side, upstream=upstream.url, stage="stream").message
                else:
                    cause = f"{ended.replace('_', ' ')} timeout" if ended == "decode_total" else ended
                error = UpstreamStreamBroken(f"{side} stream broke: {cause}", side=side, upstream=upstream.url,
                                             stage="stream")
                record.error = error.message
                out.write((b"" if relay.on_event_boundary else SSE_EVENT_END) + error.sse_event())
                out.end()
                return error.message
            out.end()
            return None
        finally:
            open_streams.discard(relay)
            relay.close()
