"""pdproxy's HTTP/1.1 server: one asyncio Protocol per connection, httptools (llhttp) parsing, one task per request.

Connection life (one timer handle per connection, re-armed lazily: moving a deadline is an assignment):

    connect ──header_timeout──▶ head ──body_timeout (per read)──▶ body complete ──▶ handler task ──▶ response
       ▲                                                                                              │
       └──────────── keepalive_timeout while idle ◀── keep-alive ◀────────────────────────────────────┘

Pipelined requests are parsed as they arrive and queued; the next handler starts only after the previous one
returned, so answers go out in order. While a request waits in the queue reading is paused, which bounds the
queue by one socket read (plus one partial head bounded by max_header_bytes). Everything the server refuses itself
(limits, timeouts, malformed input) is answered in OpenAI's error shape and reported through `on_event`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from email.utils import formatdate
from http import HTTPStatus

import httptools

from pdproxy.errors import (
    ExpectationFailed,
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    Unavailable,
)
from pdproxy.http.encoding import decode_body
from pdproxy.http.limits import LARGE_BODY_BYTES, BodyBudget, ServerLimits
from pdproxy.http.request import Headers, Request, ResponseStream
from pdproxy.http.response import Response
from pdproxy.http.router import Handler, Router

logger = logging.getLogger("pdproxy.http")

EventHook = Callable[[str, "Request | None", int], None]

DEFAULT_LIMITS = ServerLimits()  # frozen: safe to share
WRITE_HIGH_WATER = 64 * 1024  # above it ResponseStream.paused turns True and the send timer runs
WRITE_LOW_WATER = 16 * 1024
LINGER_TIMEOUT = 2.0  # after a refusal, how long the server reads (and drops) what the client still sends
MAX_LINGERING_REFUSALS = 256  # connections refused at the cap that may linger at once; more are closed at once
RESERVED_FDS = 512  # descriptors kept for listeners, upstream pools and probes (a quarter of a smaller limit)
WARN_INTERVAL = 1.0  # at most one "malformed request" line per this many seconds

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_HOP_BY_HOP = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive", "date"))

# connection states (of the request being read)
_IDLE = 0  # between requests: no byte of the next one yet
_HEAD = 1  # request line / headers arriving
_BODY = 2  # head complete, body arriving

# what the connection's one timer is waiting for
_NO_TIMER = ""
_HEADER = "header_timeout"
_BODY_T = "body_timeout"
_KEEPALIVE = "keepalive_timeout"
_SEND = "send_timeout"
_LINGER = "linger"


class _Stop(Exception):
    """Raised from a parser callback to stop parsing: the connection answers a refusal and closes."""


class _Refusal:
    """An answer the server gives itself (a limit, a timeout, malformed input), queued in order with requests."""

    __slots__ = ("error", "reason", "request")

    def __init__(self, error: ProxyError | None, reason: str, request: Request | None) -> None:
        self.error = error  # None: close silently
        self.reason = reason
        self.request = request


class _WarnLimiter:
    """At most one WARNING per interval; the next line says how many were suppressed."""

    __slots__ = ("_clock", "_next", "_suppressed")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + WARN_INTERVAL
        if self._suppressed:
            logger.warning(message + " (%d similar suppressed)", *args, self._suppressed)
            self._suppressed = 0
        else:
            logger.warning(message, *args)


class Server:
    """A running listener. `connections`: open now; `requests`: handlers running now."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolve: Callable[[Request], Handler],
                 limits: ServerLimits, on_event: EventHook | None, budget: BodyBudget) -> None:
        self.url = ""
        self.port = 0
        self.requests = 0
        self.limits = limits
        self.budget = budget
        self.draining = False
        self._loop = loop
        self._resolve = resolve
        self._on_event = on_event
        self._listener: asyncio.AbstractServer | None = None
        self._conns: set[HttpConnection] = set()  # counted against max_connections
        self._refused: set[HttpConnection] = set()  # over max_connections, answered 503, lingering
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._date_second = -1
        self._date = ""
        self.warnings = _WarnLimiter(loop.time)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def date(self) -> str:
        """The Date header value, formatted at most once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True)
        return self._date

    def event(self, reason: str, request: Request | None, status: int) -> None:
        """Report a refusal the server made itself; a failing hook never breaks the connection."""
        if self._on_event is None:
            return
        try:
            self._on_event(reason, request, status)
        except Exception:
            logger.exception("on_event hook failed for %s", reason)

    def _admit(self, conn: HttpConnection) -> bool:
        if len(self._conns) >= self.limits.max_connections:
            self._refused.add(conn)
            return False
        self._conns.add(conn)
        self._all_closed.clear()
        return True

    def _forget(self, conn: HttpConnection) -> None:
        self._refused.discard(conn)
        self._conns.discard(conn)
        if not self._conns:
            self._all_closed.set()

    async def drain(self, timeout: float) -> None:
        """Stop accepting; close idle keep-alive connections now; let requests in progress finish (their responses
        carry Connection: close); after `timeout`, close whatever is left."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns):
            conn.close_if_idle()
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        await self.close()

    async def close(self) -> None:
        """Close the listener and every connection; wait (bounded) until their handlers have ended."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns) + list(self._refused):
            conn.abort()
        try:  # abort() calls connection_lost on the next loop iteration; it cancels the handlers
            await asyncio.wait_for(self._all_closed.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs one handler at a time, writes answers in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server._loop
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._closed = False
        self._ignore_input = False  # no request after this point is parsed (refused, or Connection: close)
        self._lingering = False
        self._half_closed = False  # the client's FIN came after complete requests (answer_half_closed only)
        self._reading_paused = False
        self._writing_paused = False
        # the request being read
        self._state = _IDLE
        self._url = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0  # exact: request line + header lines, from the parser's callbacks
        self._unheaded = 0  # raw bytes fed since the head began: bounds what httptools buffers inside a header
        self._content_length: int | None = None
        self._expect: str | None = None
        self._content_encoding: str | None = None
        self._body: list[bytes] = []
        self._buffer: bytearray | None = None  # a large body's one buffer (LARGE_BODY_BYTES and over): no join
        self._body_size = 0
        self._held = 0  # body budget held by the request being read
        self._reading: Request | None = None
        self._continue_pending = False
        # queued and running requests
        self._queue: deque[Request | _Refusal] = deque()
        self._task: asyncio.Task[None] | None = None
        self._active: Request | None = None
        self._stream: ResponseStream | None = None
        self._status = 0  # status of the response being written (for on_event)
        # the one timer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._timer_kind = _NO_TIMER
        self._deadline = 0.0

    # ---- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if not self._server._admit(self):
            self._server.event("max_connections", None, 503)
            self._write_refusal(_Refusal(Unavailable("too many connections to pdproxy; retry shortly",
                                                     retry_after=1), "max_connections", None), report=False,
                                linger=len(self._server._refused) <= MAX_LINGERING_REFUSALS)
            return
        self._arm(_HEADER, self._limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._ignore_input:
            return  # lingering after a refusal, or past a Connection: close request: dropped
        if self._state == _BODY:
            if self._timer_kind == _BODY_T:
                self._deadline = self._loop.time() + self._limits.body_timeout
        else:
            self._unheaded += len(data)
        try:
            self._parser.feed_data(data)
        except _Stop:
            pass
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):  # a bug in a callback: answer 400 and say so loudly
                logger.error("HTTP parser callback failed", exc_info=exc.__context__ or exc)
                self._refuse(InvalidRequest("malformed HTTP request"), "malformed")
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: not supported; the request (already queued) is answered, then the connection closes
            self._ignore_input = True
            if self._queue and isinstance(self._queue[-1], Request):
                self._queue[-1].keep_alive = False
        except httptools.HttpParserError as exc:
            self._malformed(str(exc) or type(exc).__name__)
        else:
            if self._state == _HEAD and self._unheaded > self._limits.max_header_bytes + 4:
                self._refuse(HeadersTooLarge(f"the request head is larger than {self._limits.max_header_bytes} "
                                             "bytes"), "headers_too_large")
        self._next()
        if self._queue and not self._reading_paused and not self._closed:
            self._reading_paused = True  # bounds the pipeline: resumed when the queue empties
            self._transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        if self._lingering:
            return False
        if self._limits.answer_half_closed and self._state == _IDLE and (self._task is not None or self._queue):
            # answer_half_closed: a FIN after complete requests is a half-close. The transport stays open for
            # writing; nothing more can be read, so the last answer carries Connection: close and closes. A
            # client that is really gone is found by the first write that fails (connection_lost cancels then).
            self._ignore_input = True
            self._half_closed = True
            return True
        # A client's FIN while its request is served means it is gone, as nginx, Envoy and uvicorn read it:
        # TCP cannot tell a half-close from a close, and answering "half-closed" clients would keep every
        # vanished client's prefill and decode running until their timeouts. connection_lost cancels the handler.
        if self._state == _BODY and self._reading is not None:
            self._server.event("client_closed", self._reading, 499)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._ignore_input = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done():
            if self._timer_kind != _SEND:  # a send timeout was reported already
                self._server.event("client_closed", self._active, 499)
            task.cancel()  # the handler's upstream calls are cancelled with it
        budget = self._server.budget
        if self._held:
            budget.give(self._held)
            self._held = 0
        for item in self._queue:
            if isinstance(item, Request) and item._budget:
                budget.give(item._budget)
                item._budget = 0
        self._queue.clear()
        self._server._forget(self)
        stream = self._stream
        if stream is not None and stream.paused and stream.on_drain is not None:
            stream.paused = False  # wake a relay waiting for drain: its writes are dropped from now on
            stream.on_drain()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._stream is not None:
            self._stream.paused = True
        if not self._lingering:
            self._arm(_SEND, self._limits.send_timeout)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._timer_kind == _SEND:
            self._timer_kind = _NO_TIMER
            if self._task is None:
                self._arm_read_timer()
        stream = self._stream
        if stream is not None:
            stream.paused = False
            if stream.on_drain is not None:
                stream.on_drain()

    # ---- httptools callbacks (the request being read) ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._url = b""
        self._raw_headers = []
        self._head_bytes = 0
        self._content_length = None
        self._expect = None
        self._content_encoding = None
        self._body = []
        self._buffer = None
        self._body_size = 0
        self._held = 0
        self._reading = None
        self._continue_pending = False
        if self._task is None and self._timer_kind == _KEEPALIVE:
            self._arm(_HEADER, self._limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            self._stop(HeadersTooLarge(f"the request line is longer than {self._limits.max_header_bytes} bytes"),
                       "headers_too_large")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        raw = self._raw_headers
        size = self._head_bytes = self._head_bytes + len(name) + len(value) + 4
        if size > limits.max_header_bytes:
            self._stop(HeadersTooLarge(f"the request head is larger than {limits.max_header_bytes} bytes"),
                       "headers_too_large")
        if len(raw) >= limits.max_headers:
            self._stop(HeadersTooLarge(f"the request has more than {limits.max_headers} headers"),
                       "headers_too_large")
        key = name.lower()
        if key == b"content-length":
            try:
                length = int(value)  # llhttp lets only digits through; int() is the last word
            except ValueError:
                self._stop(InvalidRequest("malformed Content-Length"), "malformed")
            if self._content_length is not None and self._content_length != length:
                self._stop(InvalidRequest("two different Content-Length headers"), "malformed")
            self._content_length = length
        elif key == b"expect":
            self._expect = value.decode("latin-1")
        elif key == b"content-encoding":
            self._content_encoding = value.decode("latin-1")
        raw.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._unheaded = 0
        self._state = _BODY
        parser = self._parser
        url = self._url
        path, _, query = url.partition(b"?")
        if not path.startswith(b"/") and path != b"*":  # absolute-form (a proxy-style request line)
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._stop(InvalidRequest("malformed request target"), "malformed")
            path, query = parsed.path or b"/", parsed.query or b""
        version = parser.get_http_version()
        request = Request(self, parser.get_method().decode("ascii"), path.decode("latin-1"),
                          query.decode("latin-1"), version, parser.should_keep_alive(),
                          Headers(self._raw_headers), self._remote)
        self._reading = request
        length = self._content_length
        limits = self._limits
        if length is not None:
            if length > limits.max_body_bytes:
                self._stop(PayloadTooLarge(f"the request body is larger than the limit of "
                                           f"{limits.max_body_bytes} bytes"), "too_large", request)
            if length and not self._server.budget.take(length):
                self._stop(Unavailable("pdproxy is reading too many request bodies; retry shortly",
                                       retry_after=1), "body_budget", request)
            self._held = length
            if length >= LARGE_BODY_BYTES:  # grown read by read: bytearray(length) would zero it in one step
                self._buffer = bytearray()
        if self._expect is not None:
            if self._expect.strip().lower() != "100-continue":
                self._stop(ExpectationFailed(f"unsupported Expect: {self._expect}", param="Expect"),
                           "malformed", request)
            if version == "1.1":
                self._continue_pending = True
                if self._task is None and not self._queue:
                    self._send_continue()
        if self._task is None and not self._queue:
            self._arm(_BODY_T, limits.body_timeout)

    def on_body(self, body: bytes) -> None:
        size = len(body)
        self._body_size += size
        buffer = self._buffer
        if buffer is None:
            self._body.append(body)  # small bodies (the hot path): kept as they came, joined once if several
        else:
            buffer += body  # a large body: glibc grows a large block in place (mremap), so no step copies it all
        if self._content_length is None:  # chunked: counted as it arrives
            if self._body_size > self._limits.max_body_bytes:
                self._stop(PayloadTooLarge(f"the request body is larger than the limit of "
                                           f"{self._limits.max_body_bytes} bytes"), "too_large", self._reading)
            if not self._server.budget.take(size):
                self._stop(Unavailable("pdproxy is reading too many request bodies; retry shortly",
                                       retry_after=1), "body_budget", self._reading)
            self._held += size
            if buffer is None and self._body_size >= LARGE_BODY_BYTES:  # from now on, one growing buffer
                self._buffer = bytearray(b"".join(self._body))
                self._body = []

    def on_message_complete(self) -> None:
        request = self._reading
        assert request is not None
        self._state = _IDLE
        self._reading = None
        self._continue_pending = False
        chunks = self._body
        if self._buffer is not None:
            body: bytes | bytearray = self._buffer
            self._buffer = None
        else:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._body = []
        if self._content_encoding is not None:
            try:
                decoded = decode_body(body, self._content_encoding, self._limits.max_body_bytes)
            except ProxyError as exc:
                reason = "too_large" if isinstance(exc, PayloadTooLarge) else "malformed"
                self._stop(exc, reason, request)
            extra = len(decoded) - len(body)
            if extra > 0:
                if not self._server.budget.take(extra):
                    self._stop(Unavailable("pdproxy is reading too many request bodies; retry shortly",
                                           retry_after=1), "body_budget", request)
                self._held += extra
            body = decoded
        request.body = body
        request._budget = self._held
        self._held = 0
        if not request.keep_alive:
            self._ignore_input = True  # nothing after a Connection: close request is read
        self._queue.append(request)
        if self._task is None and self._timer_kind in (_HEADER, _BODY_T):
            self._timer_kind = _NO_TIMER

    # ---- refusals ------------------------------------------------------------------------------------------------

    def _stop(self, error: ProxyError, reason: str, request: Request | None = None) -> None:
        """Refuse from inside a parser callback: queue the answer and stop parsing (raises)."""
        self._refuse(error, reason, request)
        raise _Stop

    def _refuse(self, error: ProxyError | None, reason: str, request: Request | None = None) -> None:
        """Queue a refusal behind the requests already parsed; nothing more is read from this connection."""
        self._ignore_input = True
        self._buffer = None
        if self._held:  # the body being read is dropped with its request
            self._server.budget.give(self._held)
            self._held = 0
        self._queue.append(_Refusal(error, reason, request or self._reading))

    def _malformed(self, detail: str) -> None:
        self._server.warnings.warn("malformed request from %s: %s", self._remote, detail)
        self._refuse(InvalidRequest(f"malformed HTTP request: {detail}"), "malformed")

    def _write_refusal(self, refusal: _Refusal, report: bool = True, linger: bool = True) -> None:
        """Answer a refusal (or close silently), then linger: read and drop input until EOF, bounded.
        `linger` False: close right after the answer (a flood over the connection cap must not hold a
        descriptor per refused client for LINGER_TIMEOUT: that is how it would exhaust them)."""
        self._ignore_input = True
        error = refusal.error
        status = 0 if error is None else error.status
        if report:
            self._server.event(refusal.reason, refusal.request, status)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if error is None:
            transport.close()
            return
        response = error.response()
        transport.write(self._head(response.status, response.headers, response.content_type,
                                   len(response.body), close=True) + response.body)
        if linger:
            self._linger()
        else:
            transport.close()

    def _linger(self) -> None:
        """Close our side after the answer, but keep reading (and dropping) so unread input does not make the
        kernel reset the connection before the client has read the answer."""
        transport = self._transport
        assert transport is not None
        self._lingering = True
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self._arm(_LINGER, LINGER_TIMEOUT)
        else:
            transport.close()

    # ---- running requests ----------------------------------------------------------------------------------------

    def _next(self) -> None:
        """Start the next queued item if no handler runs (answers go out in order)."""
        if self._task is not None or self._closed or self._lingering:
            return
        queue = self._queue
        while queue:
            item = queue.popleft()
            if isinstance(item, _Refusal):
                queue.clear()
                self._write_refusal(item)
                return
            self._start(item)
            return
        if self._reading_paused and not self._ignore_input:
            self._reading_paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]

    def _start(self, request: Request) -> None:
        self._active = request
        self._server.requests += 1
        if self._timer_kind != _SEND:
            self._timer_kind = _NO_TIMER  # the handler's own time is the app's to bound
        handler = self._server._resolve(request)
        task = self._loop.create_task(self._run(request, handler))
        self._task = task
        self._server._tasks.add(task)
        # the bookkeeping runs in a done callback, not in _run's finally: a task cancelled before its first step
        # never runs its coroutine at all
        task.add_done_callback(self._handler_done)

    async def _run(self, request: Request, handler: Handler) -> None:
        """Run one handler and write its answer. Cancelled when the client goes away (connection_lost)."""
        try:
            response = await handler(request)
        except ProxyError as exc:
            if self._stream is not None:  # the stream's head is out: the handler had to say it in the stream
                logger.debug("%s %s: %s after its stream started; closing", request.method, request.path, exc)
                self.abort()
                return
            response = exc.response()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("handler for %s %s failed", request.method, request.path)
            response = ProxyError("internal error in pdproxy; its log has the details").response()
            if self._stream is not None:
                self.abort()  # a stream already started: never a second response inside it
                return
        if self._closed:
            return
        stream = self._stream
        if stream is not None:
            if response is not None:
                logger.error("handler for %s %s returned a response after starting a stream",
                             request.method, request.path)
                self.abort()
                return
            stream.end()
        elif response is None:
            logger.error("handler for %s %s returned None without starting a stream",
                         request.method, request.path)
            response = ProxyError("internal error in pdproxy; its log has the details").response()
        if response is not None:
            self._write_response(request, response)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        """Every end of a handler (returned, raised, cancelled, never started): budget back, counters down, then
        the next request."""
        self._server._tasks.discard(task)
        request = self._active
        assert request is not None
        if request._budget:
            self._server.budget.give(request._budget)
            request._budget = 0
        self._server.requests -= 1
        self._task = None
        self._active = None
        request._conn = None  # start_stream is over for it; an access log may keep the request, not the socket
        stream = self._stream
        self._stream = None
        if not task.cancelled() and task.exception() is not None:  # _run itself failed: a bug in the server
            logger.error("request task for %s %s failed", request.method, request.path, exc_info=task.exception())
            self.abort()
            return
        if not self._closed:
            self._after_response(request, stream)

    def _closing(self, request: Request) -> bool:
        return (not request.keep_alive or self._server.draining or (self._ignore_input and not self._queue))

    def _write_response(self, request: Request, response: Response) -> None:
        body = response.body
        self._status = response.status
        head = self._head(response.status, response.headers, response.content_type, len(body),
                          close=self._closing(request), keep_alive_10=request.version == "1.0")
        transport = self._transport
        assert transport is not None
        if request.method == "HEAD":
            transport.write(head)
        elif len(body) < 65536:
            transport.write(head + body)
        else:  # a large body is not copied into the head
            transport.write(head)
            transport.write(body)

    def start_stream(self, request: Request, status: int, headers: Sequence[tuple[str, str]]) -> ResponseStream:
        """Write a streamed response's head (see Request.start_stream)."""
        if request is not self._active or self._stream is not None:
            raise RuntimeError("start_stream called twice or outside the request's handler")
        transport = self._transport
        assert transport is not None
        chunked = request.version != "1.0"
        self._status = status
        stream = ResponseStream(transport, status, chunked, self._writing_paused)
        self._stream = stream
        if not chunked:
            request.keep_alive = False  # close-delimited body
        if not transport.is_closing():
            transport.write(self._head(status, headers, "", None, close=self._closing(request), chunked=chunked))
        return stream

    def _after_response(self, request: Request, stream: ResponseStream | None) -> None:
        if self._closing(request):
            self._ignore_input = True
            self._close()
            return
        self._next()
        if self._task is None and not self._closed and not self._lingering:
            if self._continue_pending and self._state == _BODY:
                self._send_continue()
            if not self._writing_paused:
                self._arm_read_timer()

    def _send_continue(self) -> None:
        self._continue_pending = False
        self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def _arm_read_timer(self) -> None:
        """The timer for the state of the request being read, once no handler runs."""
        if self._state == _IDLE:
            self._arm(_KEEPALIVE, self._limits.keepalive_timeout)
        elif self._state == _HEAD:
            self._arm(_HEADER, self._limits.header_timeout)
        else:
            self._arm(_BODY_T, self._limits.body_timeout)

    def _head(self, status: int, headers: Sequence[tuple[str, str]], content_type: str, length: int | None,
              close: bool, keep_alive_10: bool = False, chunked: bool = False) -> bytes:
        """The response head, written once: status line, the handler's headers, then framing."""
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nDate: {self._server.date()}\r\n"]
        has_type = False
        for name, value in headers:
            key = name.lower()
            if key in _HOP_BY_HOP:
                continue  # framing is the server's
            if key == "content-type":
                has_type = True
            lines.append(f"{name}: {value}\r\n")
        if content_type and not has_type:
            lines.append(f"Content-Type: {content_type}\r\n")
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        if close:
            lines.append("Connection: close\r\n")
        elif keep_alive_10:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    # ---- timers and closing -------------------------------------------------------------------------------------

    def _arm(self, kind: str, delay: float) -> None:
        deadline = self._loop.time() + delay
        self._timer_kind = kind
        self._deadline = deadline
        if self._timer is None or self._timer_when > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind == _NO_TIMER or self._closed:
            return
        if self._loop.time() < self._deadline:  # the deadline moved (or the loop woke early): sleep again
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            self._timer_when = self._deadline
            return
        self._timer_kind = _NO_TIMER
        transport = self._transport
        assert transport is not None
        if kind == _KEEPALIVE:
            self._server.event(_KEEPALIVE, None, 0)
            self._close()
        elif kind == _HEADER:
            if self._state == _IDLE:  # not one byte since connect: close silently
                self._server.event(_HEADER, None, 0)
                self._ignore_input = True
                self._close()
            else:
                self._refuse(RequestTimeout(f"the request head took longer than "
                                            f"{self._limits.header_timeout:g}s"), _HEADER)
                self._next()
        elif kind == _BODY_T:
            self._refuse(RequestTimeout(f"the request body stalled for longer than "
                                        f"{self._limits.body_timeout:g}s"), _BODY_T, self._reading)
            self._next()
        elif kind == _SEND:
            self._timer_kind = _SEND  # tells connection_lost the event is reported
            self._server.event(_SEND, self._active, self._status)
            transport.abort()  # close() would wait for a buffer the client never reads
        elif kind == _LINGER:
            transport.abort()

    def _close(self) -> None:
        """Close after what was written is flushed (the client has read its whole request's answer)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._half_closed:
            transport.close()  # the client's FIN came already: no unread input to linger for
        elif self._state != _IDLE or self._reading_paused:
            self._linger()  # input may still be unread: do not let the kernel reset the connection
        else:
            transport.close()

    def close_if_idle(self) -> None:
        """For drain: close now if no request is in progress; otherwise its response closes the connection."""
        if self._task is None and not self._queue and self._state == _IDLE and not self._lingering:
            self._ignore_input = True
            self._close()

    def abort(self) -> None:
        """Close at once, dropping unsent bytes (connection_lost cancels the handler)."""
        if self._transport is not None:
            self._transport.abort()


async def start_server(router_or_handler: Router | Handler, host: str, port: int, *,
                       limits: ServerLimits = DEFAULT_LIMITS, reuse_port: bool = False, backlog: int = 2048,
                       sock: socket.socket | None = None, on_event: EventHook | None = None,
                       budget: BodyBudget | None = None) -> Server:
    """Listen on host:port (port 0: a free one) or on a pre-bound `sock`; serve every request with the router or
    the single handler. `on_event(reason, request_or_None, status)` hears every refusal the server makes itself.
    `budget`: share one body budget between listeners of the process (default: one per server)."""
    loop = asyncio.get_running_loop()
    if isinstance(router_or_handler, Router):
        resolve: Callable[[Request], Handler] = router_or_handler.resolve
    else:
        handler = router_or_handler

        def resolve(request: Request) -> Handler:
            return handler

    server = Server(loop, resolve, fit_to_fd_limit(limits), on_event, budget or BodyBudget(limits.body_budget_bytes))
    if sock is not None:
        listener = await loop.create_server(lambda: HttpConnection(server), sock=sock, backlog=backlog)
    else:
        listener = await loop.create_server(lambda: HttpConnection(server), host, port, backlog=backlog,
                                            reuse_port=reuse_port or None)
    server._listener = listener
    address = listener.sockets[0].getsockname()
    server.port = address[1]
    shown = address[0] if ":" not in address[0] else f"[{address[0]}]"
    server.url = f"http://{shown}:{server.port}"
    return server



def fit_to_fd_limit(limits: ServerLimits, soft_limit: int | None = None) -> ServerLimits:
    """`limits` with max_connections lowered (one INFO line) to what the process's open-file limit can hold:
    a proxied stream holds two descriptors (client and upstream), so a client flood at the cap must still
    leave one for every upstream call and health probe. Otherwise EMFILE would fail the proxy's own
    connects, and a healthy upstream would be blamed for them."""
    if soft_limit is None:
        try:
            import resource
        except ImportError:  # not on POSIX: nothing to fit
            return limits
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft_limit == resource.RLIM_INFINITY:
            return limits
    fits = max(1, (soft_limit - min(RESERVED_FDS, soft_limit // 4) - MAX_LINGERING_REFUSALS) // 2)
    if limits.max_connections <= fits:
        return limits
    logger.info("max_connections %d lowered to %d: the open-file limit is %d (ulimit -n), and every proxied "
                   "stream holds two descriptors; raise the limit to allow more", limits.max_connections, fits,
                   soft_limit)
    return dataclasses.replace(limits, max_connections=fits)
