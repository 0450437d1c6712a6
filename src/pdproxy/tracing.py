"""OpenTelemetry tracing (the optional extra `otel`), off by default.

One span per request (`pdproxy.request`, a SERVER span continuing the client's W3C `traceparent`), with a
child span for each stage: `pdproxy.queue` (admission), `pdproxy.prefill` (one per attempt, a CLIENT span),
`pdproxy.decode.first_byte` (D's call until its first byte) and `pdproxy.decode.stream` (the relay). Each
leg carries the `traceparent` of its own span, so an engine that traces (vLLM's --otlp-traces-endpoint)
hangs its spans under the proxy's.

Off is a null object (`NO_TRACING`): `start()` hands back one shared do-nothing trace, so the request path
calls a few empty methods per request and never touches the relay's per-chunk path; opentelemetry is not
even imported.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

REQUEST_SPAN = "pdproxy.request"
QUEUE_SPAN = "pdproxy.queue"
PREFILL_SPAN = "pdproxy.prefill"
DECODE_FIRST_BYTE_SPAN = "pdproxy.decode.first_byte"
DECODE_STREAM_SPAN = "pdproxy.decode.stream"
UPSTREAM_SPAN = "pdproxy.upstream"  # a pass-through route's call (one per attempt)
FLOW_SPAN = "pdproxy.flow"  # one PD flow of a fanned-out request (a batch or n > 1), under its request span
TRACE_HEADERS = ("traceparent", "tracestate")
_CLIENT_SPANS = frozenset({PREFILL_SPAN, DECODE_FIRST_BYTE_SPAN, UPSTREAM_SPAN})  # spans of an upstream call


class Span(Protocol):
    """One stage of a request."""

    def set(self, key: str, value: str | int | float | bool) -> None: ...

    def headers(self) -> bytes:
        """`traceparent` (and `tracestate`) header lines for an upstream call made in this span."""
        ...

    def end(self, error: str | None = None, at: float | None = None) -> None:
        """End now, or at `at` (a `time.perf_counter()` reading: a stage whose end was seen earlier)."""
        ...


class RequestTrace(Protocol):
    """A request's span and the factory of its stages' spans."""

    def child(self, name: str, start: float | None = None, **attributes: str | int | float | bool) -> Span:
        """A stage's span, started now or at `start` (a `time.perf_counter()` reading)."""
        ...

    def flow(self, request_id: str, index: int) -> RequestTrace:
        """A fanned-out request's sub-flow: its own request-like trace, under this one."""
        ...

    def end(self, status: int, error: str | None = None) -> None: ...


class Tracing(Protocol):
    enabled: bool

    def start(self, request_id: str, endpoint: str, traceparent: str | None,
              tracestate: str | None) -> RequestTrace: ...

    def shutdown(self) -> None: ...


class _NoSpan:
    """Tracing off: every call does nothing."""

    __slots__ = ()

    def set(self, key: str, value: str | int | float | bool) -> None:
        return None

    def headers(self) -> bytes:
        return b""

    def end(self, error: str | None = None, at: float | None = None) -> None:
        return None


class _NoTrace:
    __slots__ = ()

    def child(self, name: str, start: float | None = None, **attributes: str | int | float | bool) -> Span:
        return NO_SPAN

    def flow(self, request_id: str, index: int) -> RequestTrace:
        return self

    def end(self, status: int, error: str | None = None) -> None:
        return None


class NoTracing:
    enabled = False

    def start(self, request_id: str, endpoint: str, traceparent: str | None,
              tracestate: str | None) -> RequestTrace:
        return NO_TRACE

    def shutdown(self) -> None:
        return None


NO_SPAN = _NoSpan()
NO_TRACE = _NoTrace()
NO_TRACING = NoTracing()


def _epoch_ns(perf: float) -> int:
    """A `time.perf_counter()` reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


class OtelSpan:
    __slots__ = ("_propagator", "_span", "_status")

    def __init__(self, span: Any, propagator: Any, status: Any) -> None:
        self._span = span
        self._propagator = propagator
        self._status = status

    def set(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)

    def headers(self) -> bytes:
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(self._span))
        return "".join(f"{name}: {value}\r\n" for name, value in carrier.items()).encode("latin-1", "replace")

    def end(self, error: str | None = None, at: float | None = None) -> None:
        if error:
            self._span.set_status(self._status(error))
        self._span.end(end_time=None if at is None else _epoch_ns(at))


class OtelRequestTrace:
    __slots__ = ("_context", "_owner", "span")

    def __init__(self, owner: OtelTracing, span: Any) -> None:
        from opentelemetry.trace import set_span_in_context

        self._owner = owner
        self.span = span
        self._context = set_span_in_context(span)

    def child(self, name: str, start: float | None = None, **attributes: str | int | float | bool) -> Span:
        owner = self._owner
        kind = owner.client_kind if name in _CLIENT_SPANS else owner.internal_kind
        span = owner.tracer.start_span(name, context=self._context, kind=kind, attributes=attributes,
                                       start_time=None if start is None else _epoch_ns(start))
        return OtelSpan(span, owner.propagator, owner.error_status)

    def flow(self, request_id: str, index: int) -> RequestTrace:
        owner = self._owner
        span = owner.tracer.start_span(FLOW_SPAN, context=self._context, kind=owner.internal_kind, attributes={
            "pdproxy.request_id": request_id, "pdproxy.flow_index": index})
        return OtelRequestTrace(owner, span)

    def end(self, status: int, error: str | None = None) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if error or status >= 500:
            self.span.set_status(self._owner.error_status(error or str(status)))
        self.span.end()


class OtelTracing:
    """Spans through an OpenTelemetry TracerProvider (the SDK's, exporting by OTLP, in `build_tracing`)."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("pdproxy")
        self.propagator = TraceContextTextMapPropagator()
        self.client_kind, self.internal_kind, self.server_kind = SpanKind.CLIENT, SpanKind.INTERNAL, SpanKind.SERVER
        self.error_status = lambda message: Status(StatusCode.ERROR, message)

    def start(self, request_id: str, endpoint: str, traceparent: str | None,
              tracestate: str | None) -> RequestTrace:
        carrier = {name: value for name, value in (("traceparent", traceparent), ("tracestate", tracestate))
                   if value}
        context = self.propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(REQUEST_SPAN, context=context, kind=self.server_kind, attributes={
            "pdproxy.request_id": request_id, "http.route": endpoint})
        return OtelRequestTrace(self, span)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (the app's cleanup)."""
        self.provider.shutdown()


def build_tracing(endpoint: str | None, service_name: str = "pdproxy") -> Tracing:
    """NO_TRACING without an endpoint; else spans exported in batches by OTLP over HTTP to `endpoint`
    (e.g. http://collector:4318/v1/traces). ImportError names the extra when opentelemetry is missing."""
    if not endpoint:
        return NO_TRACING
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError("tracing needs the otel extra: pip install 'pdproxy[otel]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return OtelTracing(provider)


def trace_decode(record: Any, leg: Span, stream: bool, outcome: str, reason: str | None) -> None:
    """End D's first-byte span when D's first byte came (or with the call's error), and add the stream's span
    from then to now. `record` is the request's RequestRecord (its `start`, `ttft_s`, `bytes_out`, `error`)."""
    first = record.start + record.ttft_s if record.ttft_s is not None else None
    leg.set("pdproxy.outcome", outcome)
    if first is None:
        leg.end(reason or outcome)
        return
    leg.end(at=first)
    if stream:
        span = record.trace.child(DECODE_STREAM_SPAN, start=first)
        span.set("pdproxy.bytes_out", record.bytes_out)
        span.end(record.error or None)


class TracingService:
    """Flushes and stops the exporter when the app stops (an App service)."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.tracing.shutdown()
