"""What a call hands back: a whole Response, or a Stream whose body flows to a BodySink."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .errors import CallError
    from .exchange import Exchange


@dataclass(slots=True)
class Response:
    """A complete upstream response (fetch)."""

    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    reused: bool  # the connection had served an earlier request


class BodySink(Protocol):
    """Receives a stream's body synchronously from the protocol's data_received: no task wake-up per chunk.

    A sink must not raise; it must accept the rest of the chunk being parsed even right after it paused.
    """

    def on_data(self, data: bytes) -> None:
        """De-chunked body bytes, in order."""

    def on_end(self) -> None:
        """The message is complete and the connection is already back in the pool."""

    def on_error(self, error: CallError) -> None:
        """Connection lost, idle timeout or bad framing; nothing is called after this."""


class Stream:
    """A response whose head (and first body bytes) arrived; the rest flows to a sink once start() is called.

    After the message ends or fails the stream lets go of its connection, so a late pause/resume/abort never
    touches a connection that went back to the pool and serves another call.
    """

    __slots__ = ("_exchange", "complete", "first", "headers", "status")

    def __init__(self, exchange: Exchange, status: int, headers: dict[str, str], first: bytes, complete: bool) -> None:
        self._exchange = exchange
        self.status = status
        self.headers = headers
        self.first = first  # body bytes that arrived with/after the head before open() returned
        self.complete = complete  # the whole message already arrived

    @property
    def last_activity(self) -> float:
        """Loop time of the last byte from the upstream."""
        return self._exchange.last_activity

    def start(self, sink: BodySink) -> None:
        """From now on body bytes go to `sink` (the `first` bytes are not re-sent); at most once."""
        self._exchange.start(sink)

    def pause(self) -> None:
        """Stop reading from the upstream (client back-pressure); the idle timer stops too."""
        self._exchange.pause()

    def resume(self) -> None:
        """Read again; the idle timer restarts from now."""
        self._exchange.resume()

    def abort(self) -> None:
        """Close the upstream socket now (the engine sees the disconnect and aborts); no more sink callbacks."""
        self._exchange.abort()

    async def read_rest(self, max_bytes: int) -> bytes:
        """The remaining body as bytes (error statuses, small bodies); bounded by the idle timeout and max_bytes."""
        return await self._exchange.read_rest(max_bytes)
