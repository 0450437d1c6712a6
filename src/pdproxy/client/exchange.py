"""One request/response on one connection: parser callbacks, the call's single timer, delivery.

The parser is created per exchange (about a microsecond) so a HEAD response or an aborted message never leaves a
half-parsed state behind. Body bytes are either collected (fetch, read_rest, before start) or handed to the sink
inside data_received, so a streamed chunk costs no task wake-up and at most one clock read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from .errors import (
    BadResponse,
    CallError,
    ClientClosed,
    ConnectionLost,
    FirstByteTimeout,
    IdleTimeout,
    ResponseTimeout,
    ResponseTooLarge,
)
from .messages import BodySink, Response, Stream

if TYPE_CHECKING:
    from .connection import Connection

_TOTAL, _FIRST_BYTE, _IDLE = 0, 1, 2
_NO_BODY_STATUSES = (204, 304)


class _Halt(Exception):
    """Raised inside a parser callback to stop parsing; the reason is kept on the exchange."""


class Exchange:
    """The state of one call; `conn` is None once the message ended or failed (nothing touches the socket then)."""

    __slots__ = (
        "base_url", "chunks", "conn", "done", "ended", "error", "feeding", "future", "got_bytes", "halt", "head_done",
        "head_fed", "head_only", "head_size", "headers", "idle_ref", "idle_timeout", "informational", "keep_alive",
        "last_activity", "loop", "max_bytes", "max_header_bytes", "parser", "paused", "rest_future", "reused",
        "sink", "size", "started", "status", "streaming", "time", "timeout", "timer", "timer_kind", "to_close",
        "trailing",
    )

    def __init__(
        self,
        conn: Connection,
        *,
        streaming: bool,
        head_only: bool,
        max_bytes: int,
        max_header_bytes: int,
        loop: asyncio.AbstractEventLoop,
        time: Callable[[], float],
        idle_timeout: float = 0.0,
    ) -> None:
        self.conn: Connection | None = conn
        self.base_url = conn.pool.base_url
        self.loop = loop
        self.time = time
        self.streaming = streaming
        self.head_only = head_only
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.reused = conn.served > 0
        # The parser holds bound callbacks of this exchange: a cycle, broken once the exchange is over
        # (`_drop_parser`) so the exchange, its parser and its body chunks go by reference counting, never
        # waiting for the cyclic collector (two exchanges per PD request: most of the proxy's collector work).
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.feeding = False  # inside parser.feed_data: its callbacks still need the parser
        self.future: asyncio.Future[Response | Stream] | None = loop.create_future()
        self.rest_future: asyncio.Future[bytes] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.informational = False
        self.head_fed = 0
        self.head_size = 0
        self.chunks: list[bytes] = []
        self.size = 0
        self.to_close = False
        self.done = False
        self.keep_alive = False
        self.trailing = False
        self.got_bytes = False
        self.halt: CallError | None = None
        self.error: CallError | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = _TOTAL
        self.timeout = 0.0
        self.idle_timeout = idle_timeout
        self.last_activity = 0.0
        self.idle_ref = 0.0
        self.sink: BodySink | None = None
        self.started = False
        self.ended = False
        self.paused = False
        conn.exchange = self

    # ---- sending ----
    def send(self, head: bytes, body: bytes, timeout: float, kind: int) -> None:
        """Write the request and arm the call's deadline (fetch: overall; stream: first byte)."""
        conn = self.conn
        assert conn is not None and conn.transport is not None
        self.timeout = timeout
        self.timer_kind = kind
        self.timer = self.loop.call_later(timeout, self._on_timer)
        transport = conn.transport
        if transport.is_closing():
            # The server closed the (reused) connection under us: a stale keep-alive, safe to re-send.
            self.fail(ConnectionLost(f"{self.base_url}: connection closed before the request was sent"))
            return
        if len(body) <= 65536:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)

    # ---- parser callbacks (called from feed_data) -------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:
            self.trailing = True  # bytes after the complete message: the connection cannot be trusted again
            raise _Halt
        self.headers = {}
        self.head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        key = name.lower().decode("latin-1")  # llhttp lets only ASCII token characters into a name
        headers = self.headers
        if key in headers:
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}"
        else:
            headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.head_size > self.max_header_bytes:
            self.halt = BadResponse(f"{self.base_url}: response head larger than {self.max_header_bytes} bytes")
            raise _Halt
        status = self.parser.get_status_code()
        if status < 200:
            self.informational = True  # 100/103: skipped; the final response follows on the same connection
            return
        self.status = status
        self.head_done = True
        if self.head_only:
            # llhttp cannot be told the request was HEAD: end the message here and drop the parser.
            self.keep_alive = self.parser.should_keep_alive()
            self.done = True
            raise _Halt
        if status not in _NO_BODY_STATUSES:
            te = self.headers.get("transfer-encoding")
            if te is None:
                self.to_close = "content-length" not in self.headers
            else:
                self.to_close = not te.rstrip().lower().endswith("chunked")

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_data(body)
            return
        self.size += len(body)
        if self.size > self.max_bytes:
            self.halt = ResponseTooLarge(f"{self.base_url}: response body over {self.max_bytes} bytes")
            raise _Halt
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()

    # ---- events from the connection ----
    def feed(self, data: bytes) -> None:
        """Parse one read; complete, fail or release the open() waiter as the bytes allow."""
        self.got_bytes = True
        if self.streaming:
            self.last_activity = self.time()
        if not self.head_done:
            self.head_fed += len(data)
        parser = self.parser
        assert parser is not None, "a finished exchange is detached from its connection and fed nothing more"
        self.feeding = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(BadResponse(f"{self.base_url}: unexpected protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            if self.halt is not None:
                self.fail(self.halt)
                return
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _Halt):
                # The sink (caller code) raised inside on_data/on_end: drop the connection, surface the bug.
                self.abort()
                raise cause from None
            if not self.done:
                self.fail(BadResponse(f"{self.base_url}: invalid HTTP response ({exc})"))
                return
            if cause is None:
                self.trailing = True  # garbage after a complete message: finish it, never reuse the connection
            # else done via _Halt: a HEAD response, or bytes after the message (trailing); finish below
        finally:
            self.feeding = False
            if self.conn is None:
                self.parser = None  # ended inside feed_data (or by a sink): see __init__
        if self.conn is None:
            return  # the sink aborted the stream from inside on_data
        if self.done:
            self.finish()
        elif not self.head_done:
            if self.head_fed > self.max_header_bytes:
                self.fail(BadResponse(f"{self.base_url}: response head larger than {self.max_header_bytes} bytes"))
        elif self.future is not None and self.streaming and self.chunks:
            self._open_stream(complete=False)

    def lost(self, exc: Exception | None) -> None:
        """The connection closed under the exchange: the end of a read-until-close body, or a failure."""
        if self.conn is None:
            return
        if self.to_close and self.head_done and not self.done and self.halt is None:
            self.done = True
            self.keep_alive = False
            self.finish()
            return
        if not self.got_bytes:
            what = "closed the connection before responding"
        elif not self.head_done:
            what = "closed the connection mid-head"
        else:
            what = "closed the connection mid-body"
        if exc is not None:
            what = f"{what} ({exc})"
        self.fail(ConnectionLost(f"{self.base_url}: upstream {what}"))

    # ---- outcomes ----
    def finish(self) -> None:
        """The message is complete: release the connection first, then tell the waiter or the sink."""
        conn = self.conn
        assert conn is not None
        self.conn = None
        if not self.feeding:  # else feed() drops it once feed_data returned
            self.parser = None
        self._cancel_timer()
        conn.exchange = None
        conn.pool.release(conn, self.keep_alive and not self.to_close and not self.trailing)
        self.ended = True
        opening = self.future is not None
        waiter = self._take_waiter()
        if waiter is not None:
            if not opening:
                waiter.set_result(b"".join(self.chunks))  # read_rest
            elif self.streaming:
                waiter.set_result(self._new_stream(complete=True))
            else:
                body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
                waiter.set_result(Response(self.status, self.headers, body, self.reused))
        elif self.sink is not None:
            sink = self.sink
            self.sink = None  # a relay holds its Stream, which holds this exchange: no reference back
            sink.on_end()

    def fail(self, error: CallError) -> None:
        """Discard the connection and hand `error` to whoever waits; at most once, nothing after it."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if not self.feeding:  # else feed() drops it once feed_data returned
            self.parser = None
        self._cancel_timer()
        conn.exchange = None
        conn.discard()
        error.reused = self.reused
        error.got_response_bytes = self.got_bytes
        self.error = error
        waiter = self._take_waiter()
        if waiter is not None:
            waiter.set_exception(error)
        elif self.sink is not None:
            sink = self.sink
            self.sink = None
            sink.on_error(error)

    def _take_waiter(self) -> asyncio.Future[Any] | None:
        """Detach the future someone awaits (open/fetch, else read_rest); None if nobody still waits."""
        future: asyncio.Future[Any] | None = self.future
        if future is not None:
            self.future = None
        else:
            future = self.rest_future
            self.rest_future = None
        return None if future is None or future.done() else future

    def abort(self) -> None:
        """Close the socket now without telling anyone (cancellation, Stream.abort)."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if not self.feeding:  # else feed() drops it once feed_data returned
            self.parser = None
        self._cancel_timer()
        self.sink = None
        self.future = None
        conn.exchange = None
        conn.discard()

    def close_for_client(self) -> None:
        """The client is closing: end this call with ClientClosed."""
        self.fail(ClientClosed(f"{self.base_url}: client closed during the call"))

    # ---- deadlines ----
    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        kind = self.timer_kind
        if kind == _IDLE:
            # Lazy re-arm: chunks only record last_activity; the timer checks it when it fires.
            now = self.time()
            ref = max(self.last_activity, self.idle_ref)
            left = ref + self.idle_timeout - now
            if left > 0:
                self.timer = self.loop.call_later(left, self._on_timer)
                return
            self.fail(IdleTimeout(f"{self.base_url}: upstream silent for {self.idle_timeout:g} s mid-stream"))
        elif kind == _FIRST_BYTE:
            self.fail(FirstByteTimeout(f"{self.base_url}: no response within {self.timeout:g} s"))
        else:
            self.fail(ResponseTimeout(f"{self.base_url}: response not complete within {self.timeout:g} s"))

    def _arm_idle(self) -> None:
        self._cancel_timer()
        self.idle_ref = self.time()
        self.timer_kind = _IDLE
        self.timer = self.loop.call_later(self.idle_timeout, self._on_timer)

    # ---- streams ----
    def _new_stream(self, complete: bool) -> Stream:
        first = b"".join(self.chunks)
        self.chunks = []
        self.size = 0
        return Stream(self, self.status, self.headers, first, complete)

    def _open_stream(self, complete: bool) -> None:
        """Head and first body bytes are here: wake open() and switch the deadline to idle."""
        future = self.future
        self.future = None
        assert future is not None
        if future.done():
            return
        future.set_result(self._new_stream(complete))
        self._arm_idle()

    def start(self, sink: BodySink) -> None:
        if self.started:
            raise RuntimeError("stream already started")
        self.started = True
        backlog = self.chunks
        self.chunks = []
        for chunk in backlog:  # bytes that arrived after open() returned and before start()
            sink.on_data(chunk)
        if self.ended:
            sink.on_end()
        elif self.error is not None:
            sink.on_error(self.error)
        else:
            self.sink = sink

    def pause(self) -> None:
        conn = self.conn
        if conn is None or self.paused:
            return
        self.paused = True
        self._cancel_timer()  # the caller's slowness is not the upstream's silence
        assert conn.transport is not None
        conn.transport.pause_reading()

    def resume(self) -> None:
        conn = self.conn
        if conn is None or not self.paused:
            return
        self.paused = False
        assert conn.transport is not None
        conn.transport.resume_reading()
        self._arm_idle()

    async def read_rest(self, max_bytes: int) -> bytes:
        if self.started:
            raise RuntimeError("stream already started")
        self.started = True
        if self.error is not None:
            raise self.error
        if self.ended:
            return b"".join(self.chunks)
        self.max_bytes = max_bytes
        self.size = sum(len(chunk) for chunk in self.chunks)
        if self.size > max_bytes:
            self.fail(ResponseTooLarge(f"{self.base_url}: response body over {max_bytes} bytes"))
            raise self.error  # type: ignore[misc]
        if self.paused:
            self.resume()
        future = self.loop.create_future()
        self.rest_future = future
        try:
            return await future  # bounded by the idle timer
        except asyncio.CancelledError:
            self.abort()  # cancelled mid-body: the socket is closed, never pooled
            raise
