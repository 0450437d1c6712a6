"""Fan-out: a batch of prompts, or `n` > 1 samples, served as one PD flow per (prompt, sample) and merged
into one answer in vLLM's format.

It sits above the orchestrator: each sub-flow is an ordinary `Orchestrator.handle` call on a `SubRequest`
whose response stream is a collecting sink, so a plain request (one prompt, n=1) never reaches this module.

Invariants:
- sub-flow k = i*n + j serves prompt i, sample j, and its choice gets index k (vLLM's numbering);
  usage counts each prompt's tokens once (from sample 0) and every sample's completion tokens;
- each sub-flow takes its own admission slot (a batch of N weighs what N requests weigh, in the same
  FIFO queue); a batch the queue cannot hold now is refused whole, before any sub-flow starts;
- any sub-flow failing fails the whole request: the others are cancelled. Before the client saw a byte
  the answer is that sub-flow's error response; once streaming, one error event then `[DONE]`;
- when the handler is cancelled (client gone), every sub-flow is cancelled and awaited, so each
  releases its leases and in-flight count in its own `finally`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from pdproxy.errors import InvalidRequest, ProxyError, Unavailable, UpstreamBadResponse
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.proxy.orchestrator import RETRY_AFTER_SECONDS, Orchestrator
from pdproxy.request import ProxyRequest
from pdproxy.tracing import RequestTrace

logger = logging.getLogger("pdproxy.fanout")

SSE_DONE = b"data: [DONE]\n\n"
CANCEL_WAIT_SECONDS = 5.0  # cancelled sub-flows end at their next await; this only bounds a stuck one
_EVENT_END = b"\n\n"


def check_width(prompts: int, n: int, max_fanout: int) -> None:
    """400 when a request would run more sub-flows than `max_fanout`."""
    if prompts * n > max_fanout:
        param = "n" if n > 1 else "prompt"
        raise InvalidRequest(f"this request needs {prompts * n} PD flows ({prompts} prompt(s) x n={n}); "
                             f"pdproxy runs at most {max_fanout} per request (--max-fanout)", param=param)


def sub_bodies(body: dict[str, Any], prompts: int, n: int) -> list[dict[str, Any]]:
    """One client body per sub-flow, in choice order: the prompt alone, `n` dropped.

    `seed` (an integer) becomes seed + j for sample j: the samples differ as n samples should, sample 0
    is what the same request with n=1 would get, and the whole answer is reproducible."""
    batch = body.get("prompt") if prompts > 1 else None
    seed = body.get("seed")
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    bodies = []
    for i in range(prompts):
        for j in range(n):
            sub = dict(body)  # shallow: sub-flows only replace top-level keys
            sub.pop("n", None)
            if batch is not None:
                sub["prompt"] = batch[i]
            if seeded and j:
                sub["seed"] = seed + j
            bodies.append(sub)
    return bodies


class SubRequest:
    """The client request as one sub-flow sees it: its stream is a `SubSink`, everything else the client's."""

    __slots__ = ("_merger", "_parent", "index", "trace")

    def __init__(self, parent: Request, merger: StreamMerger, index: int, trace: RequestTrace | None) -> None:
        self._parent = parent
        self._merger = merger
        self.index = index
        self.trace = trace  # the whole request's trace (tracing on): the orchestrator starts this flow's under it

    def start_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> SubSink:
        return self._merger.start(self.index, status, headers)

    def __getattr__(self, name: str) -> Any:  # remote, headers, ...: the client's
        return getattr(self._parent, name)


class SubSink:
    """One sub-flow's stream: splits D's bytes into SSE events and hands whole events to the merger.
    Back-pressure is the client's: `paused` mirrors its stream, its drain wakes every sub-flow's relay."""

    __slots__ = ("_buffer", "_merger", "index", "on_drain")

    def __init__(self, merger: StreamMerger, index: int) -> None:
        self._merger = merger
        self._buffer = b""
        self.index = index
        self.on_drain: Any = None

    @property
    def paused(self) -> bool:
        out = self._merger.out
        return out is not None and out.paused

    def write(self, data: bytes) -> None:
        buffer = self._buffer + data
        *events, self._buffer = buffer.split(_EVENT_END)
        for event in events:
            self._merger.event(self.index, event)

    def end(self) -> None:
        self._buffer = b""  # an event without its blank line never completed: dropped

    def ends_on_event_boundary(self) -> bool:
        return not self._buffer


@dataclass(slots=True)
class _Usage:
    """Summed usage; prompts count once each (from sample 0), completions per sample."""

    prompt: int = 0
    completion: int = 0
    cached: int | None = None
    seen: bool = False

    def add(self, usage: Any, first_sample: bool) -> None:
        if not isinstance(usage, dict):
            return
        self.seen = True
        if first_sample:
            self.prompt += _int(usage.get("prompt_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                self.cached = (self.cached or 0) + _int(details.get("cached_tokens"))
        self.completion += _int(usage.get("completion_tokens"))

    def render(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt, "total_tokens": self.prompt + self.completion,
                                 "completion_tokens": self.completion}
        if self.cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class StreamMerger:
    """Interleaves the sub-flows' SSE events into the client's one stream, as they come.

    Each event is parsed once (fan-out requests only), its choices' indexes rewritten to the sub-flow's,
    its id and `created` set to the first event's; usage-only events are summed, `[DONE]` dropped: the
    merger writes one usage event (when asked) and one `[DONE]` at the end."""

    __slots__ = ("_head", "_n", "_parent", "_request_id", "_sinks", "broken", "closed", "out", "usage")

    def __init__(self, parent: Request, request_id: str, n: int, width: int) -> None:
        self._parent = parent
        self._request_id = request_id
        self._n = n
        self._sinks: list[SubSink | None] = [None] * width
        self._head: dict[str, Any] | None = None  # id, object, created, model of the first event out
        self.out: Any = None  # the client's ResponseStream once the first sub-flow has bytes
        self.usage = _Usage()
        self.closed = False  # failed or finished: nothing more is written
        self.broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # an error event came

    def start(self, index: int, status: int, headers: Sequence[tuple[str, str]]) -> SubSink:
        """A sub-flow's first byte: the client's stream starts with the first of them."""
        sink = SubSink(self, index)
        self._sinks[index] = sink
        if self.out is None and not self.closed:
            own = [(name, self._request_id if name.lower() == "x-request-id" else value) for name, value in headers]
            self.out = self._parent.start_stream(status, own)
            self.out.on_drain = self._drained
        return sink

    def _drained(self) -> None:
        for sink in self._sinks:
            if sink is not None and sink.on_drain is not None:
                sink.on_drain()

    def event(self, index: int, event: bytes) -> None:
        if self.closed or not event.startswith(b"data: "):
            return
        payload = event[6:]
        if payload == b"[DONE]":
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return  # a partial event cut by a broken stream; its error event follows
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            self.fail(event + _EVENT_END)
            return
        choices = chunk.get("choices")
        if not choices:
            self.usage.add(chunk.get("usage"), index % self._n == 0)
            return
        for choice in choices:
            if isinstance(choice, dict):
                choice["index"] = index + _int(choice.get("index"))
        head = self._head
        if head is None:
            self._head = {key: chunk.get(key) for key in ("id", "object", "created", "model")}
        else:
            chunk["id"], chunk["created"] = head["id"], head["created"]
        self._write(b"data: " + orjson.dumps(chunk) + _EVENT_END)

    def _write(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.write(data)

    def fail(self, error_event: bytes) -> None:
        """One error event, then `[DONE]`; the handler cancels the other sub-flows."""
        if self.closed:
            return
        self._write(error_event + SSE_DONE)
        self.closed = True
        if self.out is not None:
            self.out.end()
        if not self.broken.done():
            self.broken.set_result(None)

    def finish(self, include_usage: bool) -> None:
        """Every sub-flow ended well: the summed usage event (when asked), then `[DONE]`."""
        if self.closed:
            return
        self.closed = True
        if include_usage:
            head = self._head or {"id": None, "object": None, "created": None, "model": None}
            self._write(b"data: " + orjson.dumps({**head, "choices": [], "usage": self.usage.render()}) + _EVENT_END)
        self._write(SSE_DONE)
        if self.out is not None:
            self.out.end()


class FanOut:
    """Runs a fan-out request's sub-flows through the orchestrator and merges their answers."""

    def __init__(self, flow: Orchestrator, max_fanout: int) -> None:
        self.flow = flow
        self.max_fanout = max_fanout

    def check(self, prompts: int, n: int) -> None:
        check_width(prompts, n, self.max_fanout)

    async def handle(self, request: Request, preq: ProxyRequest, prompts: int, n: int) -> Response | None:
        """Serve `prompts` x `n` sub-flows as one answer; None when it was streamed through `request`.
        With tracing on, the request is one span and each sub-flow a `pdproxy.flow` span under it."""
        tracing = self.flow.tracing
        if not tracing.enabled:
            return await self._handle(request, preq, prompts, n, None)
        trace = tracing.start(preq.request_id, preq.endpoint, request.headers.get("traceparent"),
                              request.headers.get("tracestate"))
        status, error = 200, None  # a streamed answer (None) went out as 200
        try:
            response = await self._handle(request, preq, prompts, n, trace)
            if response is not None:
                status = response.status
            return response
        except asyncio.CancelledError:
            status, error = 499, "client disconnected"
            raise
        finally:
            trace.end(status, error)

    async def _handle(self, request: Request, preq: ProxyRequest, prompts: int, n: int,
                      trace: RequestTrace | None) -> Response | None:
        width = prompts * n
        metrics = self.flow.metrics
        metrics.fanout_requests.inc()
        metrics.fanout_flows.inc(width)
        try:
            self._check_room(width)
        except ProxyError as exc:
            return self.flow.refuse(request, preq.endpoint, preq.request_id, exc)
        merger = StreamMerger(request, preq.request_id, n, width)
        own_line = f"X-Request-Id: {preq.request_id}\r\n".encode("latin-1")
        tasks: list[asyncio.Task[Response | None]] = []
        for k, body in enumerate(sub_bodies(preq.body, prompts, n)):
            sub_id = f"{preq.request_id}-{k}"  # P and D of each sub-flow share it, and no two sub-flows do
            headers = preq.headers.replace(own_line, f"X-Request-Id: {sub_id}\r\n".encode("latin-1"), 1)
            sub = ProxyRequest(preq.endpoint, body, preq.stream, sub_id, headers)
            tasks.append(asyncio.ensure_future(self.flow.handle(SubRequest(request, merger, k, trace), sub)))  # type: ignore[arg-type]
        try:
            failed = await self._wait(tasks, merger, preq.stream)
            if preq.stream:
                if failed is None and merger.out is None:  # every flow ended without a byte: nothing to merge
                    return UpstreamBadResponse("no sub-flow of this request streamed any data",
                                               side="decode").response(preq.request_id)
                if failed is None:
                    options = preq.body.get("stream_options")
                    merger.finish(isinstance(options, dict) and bool(options.get("include_usage")))
                    return None
                if merger.out is None:  # nothing reached the client: a plain error response
                    merger.closed = True
                    return _as_own(failed, preq.request_id)
                merger.fail(b"data: " + failed.body + _EVENT_END)
                return None
            if failed is not None:
                return _as_own(failed, preq.request_id)
            return self._merge([task.result() for task in tasks], preq.request_id, n)
        finally:
            merger.closed = True
            for task in tasks:
                task.cancel()
            # Each sub-flow releases its leases and in-flight count in its own finally, at its next await.
            if tasks:
                _, stuck = await asyncio.wait(tasks, timeout=CANCEL_WAIT_SECONDS)
                if stuck:
                    logger.error("%d sub-flow(s) of %s did not end within %gs of their cancellation",
                                 len(stuck), preq.request_id, CANCEL_WAIT_SECONDS)

    def _check_room(self, width: int) -> None:
        """Refuse up front a batch whose sub-flows would not all fit in the admission queue now."""
        flow = self.flow
        admission = flow.admission
        if flow.draining:
            raise Unavailable("pdproxy is shutting down; retry on another instance", retry_after=RETRY_AFTER_SECONDS)
        cap = flow.limits.max_concurrency
        if not cap:
            return
        free = 0 if admission.waiting else max(0, cap - flow.admitted)
        if admission.waiting + width - free > admission.max_waiting:
            flow.metrics.queue_rejections.labels("full").inc()
            raise Unavailable(f"pdproxy cannot take this request's {width} PD flows now: its queue is too full",
                              retry_after=RETRY_AFTER_SECONDS)

    @staticmethod
    async def _wait(tasks: list[asyncio.Task[Response | None]], merger: StreamMerger, stream: bool) -> Response | None:
        """Wait for every sub-flow; the first failure ends the wait: an error response (streamed, any
        response: a streamed sub-flow that succeeds answers through its sink), or an error event, which
        the merger has already written. Each sub-flow is bounded by the orchestrator's own deadlines."""
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {merger.broken}, return_when=asyncio.FIRST_COMPLETED)
            if merger.broken.done():
                return _BROKEN
            pending.discard(merger.broken)
            for task in done:
                response = task.result()
                if response is not None and (stream or response.status >= 400):
                    return response
        return None

    @staticmethod
    def _merge(responses: list[Response | None], request_id: str, n: int) -> Response:
        """The sub-flows' JSON answers as one, in choice order."""
        usage = _Usage()
        choices: list[Any] = []
        merged: dict[str, Any] | None = None
        for k, response in enumerate(responses):
            try:
                doc = orjson.loads(response.body) if response is not None else None
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
                return UpstreamBadResponse(f"sub-flow {k} of this request got an answer that is not a completion",
                                           side="decode").response(request_id)
            for choice in doc["choices"]:
                if isinstance(choice, dict):
                    choice["index"] = k + _int(choice.get("index"))
                choices.append(choice)
            usage.add(doc.get("usage"), k % n == 0)
            if merged is None:
                merged = doc
        assert merged is not None
        merged.pop("kv_transfer_params", None)  # a leg's handle, meaningless for the merged answer
        merged["choices"] = choices
        if usage.seen:
            merged["usage"] = usage.render()
        return Response(status=200, body=orjson.dumps(merged), content_type="application/json",
                        headers=(("X-Request-Id", request_id),))


# The failure was an error event in a sub-flow's stream: the merger has already written it and [DONE].
_BROKEN = Response(status=502, body=b"", content_type="application/json")


def _as_own(response: Response, request_id: str) -> Response:
    """A sub-flow's error response, answered under the client's request id."""
    headers = tuple((name, request_id if name.lower() == "x-request-id" else value)
                    for name, value in response.headers)
    return Response(status=response.status, body=response.body, content_type=response.content_type,
                    headers=headers)
