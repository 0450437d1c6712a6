"""The relay: D's body bytes go from the upstream protocol straight to the client's transport.

Invariants:
- `on_data` runs inside the upstream protocol's `data_received`: one synchronous write per chunk
  (framed once by the client side), no task wake-up and no await per chunk;
- back-pressure both ways: when the client's transport is above its high-water mark, reading from D
  pauses; the client's drain resumes it. While paused, D's idle timer does not run (the upstream
  client stops it): only D's own silence counts against D. A client that does not drain within the
  send timeout is the server's to end (it cancels the handler: the client's fault, never D's);
- the relay ends exactly once (`done`), for one of: D's message complete, D's failure (lost, idle,
  bad framing), the total deadline, or an operator's cut;
- only the last two chunks are kept (for the usage search), nothing else per chunk.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from pdproxy.client import CallError, Stream

SSE_EVENT_END = b"\n\n"


class Sink(Protocol):
    """The client side of a streamed response (the HTTP server's response stream)."""

    paused: bool
    on_drain: object

    def write(self, data: bytes) -> None: ...


class Gaps(Protocol):
    def observe(self, amount: float) -> None: ...


class Relay:
    """Relays one decode stream to one client; `done` resolves to None or to why it broke."""

    __slots__ = ("_before", "_deadline", "_ended", "_gaps", "_latest", "_loop", "_out", "_paused", "_stream",
                 "bytes", "done", "fired", "last_chunk_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: Stream, out: Sink, *, end: float | None,
                 gaps: Gaps | None) -> None:
        self._loop = loop
        self._stream = stream
        self._out = out
        self._gaps = gaps  # sampled streams only: one clock read per chunk
        self._paused = False
        self._ended = False  # not `done.done()`: cancelling the task that awaits `done` cancels the future too
        self._latest = self._before = b""
        self.bytes = 0
        self.fired: str | None = None  # "decode_total" or an operator's reason, when the relay ended it
        self.last_chunk_at = loop.time()
        self.done: asyncio.Future[CallError | str | None] = loop.create_future()
        self._deadline = loop.call_at(end, self._expire) if end is not None else None
        out.on_drain = self._drained

    def begin(self, first: bytes) -> None:
        """Write D's first bytes (already read) and let the rest flow."""
        self.on_data(first)
        self._stream.start(self)

    # -- BodySink: called from the upstream protocol -------------------------------------------
    def on_data(self, data: bytes) -> None:
        if self._ended:
            return
        out = self._out
        out.write(data)
        self.bytes += len(data)
        self._before, self._latest = self._latest, data
        if self._gaps is not None:
            now = self._loop.time()
            self._gaps.observe(now - self.last_chunk_at)
            self.last_chunk_at = now
        if out.paused and not self._paused:
            self._paused = True
            self._stream.pause()

    def on_end(self) -> None:
        self._finish(None)

    def on_error(self, error: CallError) -> None:
        self._finish(error)

    # -- the client side --------------------------------------------------------------------
    def _drained(self) -> None:
        if self._paused and not self._ended:
            self._paused = False
            self._stream.resume()

    # -- ending ------------------------------------------------------------------------------
    def fire(self, reason: str) -> None:
        """End the stream now, for `reason` (an operator's cut, the total deadline)."""
        if not self._ended:
            self.fired = reason
            self._stream.abort()
            self._finish(reason)

    def _expire(self) -> None:
        self._deadline = None
        self.fire("decode_total")

    def _finish(self, outcome: CallError | str | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self.done.done():
            self.done.set_result(outcome)

    def close(self) -> None:
        """Stop everything (the handler is leaving, maybe cancelled): D's socket closes unless it ended."""
        if not self._ended:
            self._stream.abort()
            self._finish("cancelled")
        self._out.on_drain = None

    @property
    def tail(self) -> bytes:
        """The end of the stream, where `include_usage` puts the usage."""
        return self._before[-256:] + self._latest

    @property
    def on_event_boundary(self) -> bool:
        """Whether what was written so far ends an SSE event, so an error event can follow it."""
        return (self._before + self._latest).endswith(SSE_EVENT_END) if self.bytes else True
