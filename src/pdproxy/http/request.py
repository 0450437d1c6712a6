"""What a handler sees: the parsed request (body already read) and, for streamed answers, the response stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

if TYPE_CHECKING:
    import asyncio

    from pdproxy.http.server import HttpConnection


class Headers(Mapping[str, str]):
    """Request headers: case-insensitive lookups (first value wins) over the raw (name, value) list."""

    __slots__ = ("_index", "raw")

    def __init__(self, raw: list[tuple[str, str]]) -> None:
        self.raw = raw
        self._index: dict[str, str] | None = None  # built on first lookup: most requests read few headers

    def _lookup(self) -> dict[str, str]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self.raw:
                index.setdefault(name.lower(), value)
            self._index = index
        return index

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._lookup().get(name.lower(), default)

    def getall(self, name: str) -> list[str]:
        """Every value of a repeated header, in order."""
        name = name.lower()
        return [value for key, value in self.raw if key.lower() == name]

    def __getitem__(self, name: str) -> str:
        return self._lookup()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup())

    def __len__(self) -> int:
        return len(self._lookup())

    def __repr__(self) -> str:
        return f"Headers({self.raw!r})"


class Request:
    """One client request, whole: the server calls the handler only once its body is read (and decoded).
    `path` is percent-decoded (`raw_path` is as sent); `match_info` values are decoded too."""

    __slots__ = ("_budget", "_conn", "body", "headers", "keep_alive", "match_info", "method", "path",
                 "query_string", "raw_path", "remote", "version")

    def __init__(self, conn: HttpConnection | None, method: str, path: str, query_string: str, version: str,
                 keep_alive: bool, headers: Headers, remote: str | None) -> None:
        self._conn = conn
        self._budget = 0  # body-budget bytes this request holds until its handler returns
        self.method = method
        self.raw_path = path  # as sent (percent-encoded); routing splits this one into segments
        self.path = unquote(path) if "%" in path else path
        self.query_string = query_string
        self.version = version
        self.keep_alive = keep_alive
        self.headers = headers
        self.body: bytes | bytearray = b""  # a bytearray when large (read into one preallocated buffer)
        self.remote = remote
        self.match_info: dict[str, str] = {}

    def query(self) -> Mapping[str, str]:
        """The query string's parameters (last value wins)."""
        return dict(parse_qsl(self.query_string, keep_blank_values=True))

    def start_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> ResponseStream:
        """Begin a streamed response: chunked on HTTP/1.1, close-delimited on 1.0. The handler then returns None."""
        if self._conn is None:
            raise RuntimeError("this request has no connection to stream to")
        return self._conn.start_stream(self, status, headers)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}>"


class ResponseStream:
    """A streamed response body. `write` frames one chunk and hands it to the transport: no await, no task, so a
    relay can call it straight from an upstream's data_received. Back-pressure: `paused` is True while the client's
    write buffer is above its high-water mark; `on_drain` is called when it drains below the low-water mark."""

    __slots__ = ("_chunked", "_tail", "_transport", "bytes_written", "ended", "on_drain", "paused", "status")

    def __init__(self, transport: asyncio.Transport, status: int, chunked: bool, paused: bool) -> None:
        self._transport = transport
        self._chunked = chunked
        self._tail = b""  # the last bytes of the body written, for ends_on_event_boundary
        self.status = status
        self.paused = paused
        self.on_drain: Callable[[], None] | None = None
        self.bytes_written = 0
        self.ended = False

    def write(self, data: bytes) -> None:
        """Send one piece of the body (dropped silently once the client is gone: its handler is being cancelled)."""
        if not data or self.ended or self._transport.is_closing():
            return  # an empty chunk would end a chunked body
        self.bytes_written += len(data)
        self._tail = data[-2:]
        if self._chunked:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._transport.write(data)

    def end(self) -> None:
        """Finish the body (the terminating chunk); the connection then goes on with its next request."""
        if self.ended:
            return
        self.ended = True
        if self._chunked and not self._transport.is_closing():
            self._transport.write(b"0\r\n\r\n")

    def ends_on_event_boundary(self) -> bool:
        """True if the bytes written so far end an SSE event (b"\\n\\n"), so an error event can follow cleanly."""
        return self.bytes_written == 0 or self._tail == b"\n\n"
