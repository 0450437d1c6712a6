"""pdproxy.client against real loopback servers: raw asyncio servers scripted byte for byte, and the mock engine.

Every test runs on asyncio and on uvloop (tests/functional/conftest.py). The `upstreams` fixture checks after
each test that the client closed every socket and that no task or live timer was left behind.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest

from pdproxy.client import (
    BadResponse,
    CallError,
    ClientClosed,
    ClientOptions,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    ResponseTimeout,
    ResponseTooLarge,
    UpstreamClient,
)
from pdproxy.client.exchange import Exchange
from pdproxy.mock import start_mock
from tests.conftest import closed_port_url, sse_events

if sys.version_info >= (3, 11):
    from asyncio import timeout as within
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as within

WAIT = 2.0  # every wait on a server or client event is bounded by this
LONG = 30.0  # a call deadline that must not be what ends the call


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `check()` holds (re-checked every few ms), failing after `timeout`."""
    async with within(timeout):
        while not check():  # noqa: ASYNC110 - pool counters and server lists have no change event to wait on
            await asyncio.sleep(0.005)


@dataclass
class Peer:
    """One accepted connection on a scripted server."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the handler ended (EOF seen or it closed)

    async def read_request(self) -> bytes | None:
        """The next request (head + body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    async def wait_eof(self) -> None:
        """Until the client closed its side (read returns b"" or the socket resets)."""
        try:
            async with within(WAIT):
                while await self.reader.read(65536):
                    pass
        except ConnectionError:
            pass

    def write(self, data: bytes) -> None:
        self.writer.write(data)


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class RawServer:
    """An HTTP/1.1 upstream whose bytes a test scripts: `handler(peer)` runs once per connection."""

    handler: Handler
    url: str = ""
    peers: list[Peer] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = Peer(reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            peer.closed.set()
            self.tasks.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def peer(self, index: int) -> Peer:
        await eventually(lambda: len(self.peers) > index)
        return self.peers[index]


@dataclass
class Upstreams:
    """Starts scripted servers and clients for one test; checks nothing leaked when the test ends."""

    servers: list[RawServer] = field(default_factory=list)
    clients: list[UpstreamClient] = field(default_factory=list)

    async def serve(self, handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        self.servers.append(server)
        return server

    def client(self, options: ClientOptions | None = None, **kwargs: object) -> UpstreamClient:
        client = UpstreamClient(options or ClientOptions(), **kwargs)  # type: ignore[arg-type]
        self.clients.append(client)
        return client


def live_timers(loop: asyncio.AbstractEventLoop) -> list[object]:
    """Scheduled, not cancelled timer handles (the default loop exposes them; uvloop does not)."""
    scheduled = getattr(loop, "_scheduled", None)
    if scheduled is None:
        return []
    return [h for h in scheduled if not h.cancelled()]


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    made = Upstreams()
    yield made
    for client in made.clients:
        await client.close()
        assert all(opened == 0 and idle == 0 for opened, idle in client.stats().values()), client.stats()
    for server in made.servers:
        await server.stop()
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
    assert live_timers(asyncio.get_running_loop()) == []


async def keepalive(peer: Peer) -> None:
    """Answer every request with a small body until the client closes."""
    while await peer.read_request() is not None:
        peer.write(ok(b"hello"))


def held_keepalive(release: asyncio.Event) -> Handler:
    """Like keepalive, but every answer waits until `release` is set (holds connections busy)."""

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await release.wait()
            peer.write(ok())

    return handler


async def silent(peer: Peer) -> None:
    """Read the request, never answer, wait for the client to go away."""
    await peer.read_request()
    await peer.wait_eof()


def answer(reply: bytes, *, then_close: bool = False) -> Handler:
    """A handler that reads one request, writes `reply`, then closes or waits for the client to close."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(reply)
        if not then_close:
            await peer.wait_eof()

    return handler


class Sink:
    """A BodySink that records what it was given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended = asyncio.Event()
        self.error: CallError | None = None
        self.failed = asyncio.Event()
        self.calls_after_end = 0

    def on_data(self, data: bytes) -> None:
        if self.ended.is_set() or self.failed.is_set():
            self.calls_after_end += 1
        self.data.append(data)

    def on_end(self) -> None:
        self.ended.set()

    def on_error(self, error: CallError) -> None:
        self.error = error
        self.failed.set()


# ---- request bytes and response framing ----


async def test_request_bytes_and_content_length_body(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.write(ok(b"hello", b"X-Multi: a\r\nx-multi: b\r\nContent-Type: text/plain\r\n"))

    server = await upstreams.serve(handler)
    client = upstreams.client()
    port = server.url.rsplit(":", 1)[1]
    got = await client.fetch(server.url, "GET", "/v1/models", headers=b"X-Request-Id: r1\r\n", timeout=WAIT)
    assert (got.status, got.body, got.reused) == (200, b"hello", False)
    assert got.headers == {"content-length": "5", "x-multi": "a, b", "content-type": "text/plain"}
    posted = await client.fetch(server.url, "POST", "/v1/completions", body=b'{"a":1}', timeout=WAIT)
    empty = await client.fetch(server.url, "POST", "/x", timeout=WAIT)
    assert posted.reused and empty.reused
    peer = server.peers[0]
    assert peer.requests == [
        f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Request-Id: r1\r\n\r\n".encode(),
        f'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 7\r\n\r\n{{"a":1}}'.encode(),
        f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n".encode(),
    ]


async def test_chunked_body_split_across_writes(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
            await peer.writer.drain()
            await asyncio.sleep(0.01)
            peer.write(b"lo\r\n6\r\n world\r\n0\r\n\r\n")

    server = await upstreams.serve(handler)
    client = upstreams.client()
    for _ in range(2):
        got = await client.fetch(server.url, "GET", "/", timeout=WAIT)
        assert got.body == b"hello world"
    assert len(server.peers) == 1  # a chunked message ends cleanly: the connection is reused


async def test_read_until_close_body_is_not_pooled(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await peer.writer.drain()
        peer.write(b"part two")

    server = await upstreams.serve(handler)
    client = upstreams.client()
    got = await client.fetch(server.url, "GET", "/", timeout=WAIT)
    assert got.body == b"part one, part two"
    assert client.stats()[server.url] == (0, 0)


async def test_informational_responses_are_skipped(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            peer.write(ok(b"final", b"X-Final: 1\r\n"))

    server = await upstreams.serve(handler)
    client = upstreams.client()
    for _ in range(2):
        got = await client.fetch(server.url, "POST", "/", body=b"x", timeout=WAIT)
        assert (got.status, got.body, got.headers.get("x-final"), "link" in got.headers) == (200, b"final", "1", False)
    assert len(server.peers) == 1


async def test_head_204_304_have_no_body_and_keep_the_connection(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        answers = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",  # HEAD: the length describes a GET
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
            ok(b"after"),
        ]
        for answer in answers:
            if await peer.read_request() is None:
                return
            peer.write(answer)
        await peer.wait_eof()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    head = await client.fetch(server.url, "HEAD", "/", timeout=WAIT)
    no_content = await client.fetch(server.url, "DELETE", "/", timeout=WAIT)
    not_modified = await client.fetch(server.url, "GET", "/", timeout=WAIT)
    after = await client.fetch(server.url, "GET", "/", timeout=WAIT)
    assert [(r.status, r.body) for r in (head, no_content, not_modified, after)] == [
        (200, b""), (204, b""), (304, b""), (200, b"after")
    ]
    assert len(server.peers) == 1 and after.reused


async def test_bytes_after_a_complete_message_keep_the_response_but_not_the_connection(upstreams: Upstreams) -> None:
    server = await upstreams.serve(answer(ok(b"fine") + b"\x00\x01garbage"))
    client = upstreams.client()
    got = await client.fetch(server.url, "GET", "/", timeout=WAIT)
    assert got.body == b"fine"
    assert client.stats()[server.url] == (0, 0)
    async with within(WAIT):
        await server.peers[0].closed.wait()


async def test_redirect_is_not_followed(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            peer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")

    server = await upstreams.serve(handler)
    got = await upstreams.client().fetch(server.url, "POST", "/", body=b"x", timeout=WAIT)
    assert (got.status, got.headers["location"]) == (307, "/elsewhere")
    assert len(server.peers[0].requests) == 1


# ---- keep-alive pool ----


async def test_sequential_calls_share_one_connection(upstreams: Upstreams) -> None:
    server = await upstreams.serve(keepalive)
    client = upstreams.client()
    reused = [(await client.fetch(server.url, "GET", "/", timeout=WAIT)).reused for _ in range(5)]
    assert reused == [False, True, True, True, True]
    assert len(server.peers) == 1
    assert client.stats() == {server.url: (1, 1)}


async def test_concurrent_calls_open_connections_and_keep_them_idle(upstreams: Upstreams) -> None:
    release = asyncio.Event()
    server = await upstreams.serve(held_keepalive(release))
    client = upstreams.client(ClientOptions(max_idle=2))
    calls = [asyncio.ensure_future(client.fetch(server.url, "GET", "/", timeout=WAIT)) for _ in range(3)]
    await eventually(lambda: len(server.peers) == 3 and all(p.requests for p in server.peers))
    assert client.stats() == {server.url: (3, 0)}
    release.set()
    await asyncio.gather(*calls)
    assert client.stats() == {server.url: (2, 2)}  # max_idle: the third was closed


async def test_idle_connections_expire(upstreams: Upstreams) -> None:
    server = await upstreams.serve(keepalive)
    client = upstreams.client(ClientOptions(keepalive_timeout=0.2))
    await client.fetch(server.url, "GET", "/", timeout=WAIT)
    first = await server.peer(0)
    async with within(WAIT):
        await first.closed.wait()  # the client closed it after 0.2 s idle
    assert client.stats() == {server.url: (0, 0)}
    again = await client.fetch(server.url, "GET", "/", timeout=WAIT)
    assert not again.reused and len(server.peers) == 2


async def test_server_closing_an_idle_connection_removes_it_from_the_pool(upstreams: Upstreams) -> None:
    """A server that closes idle connections after 0.3 s, a client keeping them 5 s: no call fails."""
    stale: list[str] = []

    async def handler(peer: Peer) -> None:
        while True:
            try:
                async with within(0.3):
                    request = await peer.read_request()
            except asyncio.TimeoutError:
                return  # idle close, like uvicorn's keep-alive timeout
            if request is None:
                return
            peer.write(ok())

    server = await upstreams.serve(handler)
    client = upstreams.client(ClientOptions(keepalive_timeout=5.0), on_stale_retry=stale.append)
    for index in range(3):
        got = await client.fetch(server.url, "GET", "/", timeout=WAIT)
        assert got.status == 200 and not got.reused
        peer = await server.peer(index)
        async with within(WAIT):
            await peer.closed.wait()
        await eventually(lambda: client.stats()[server.url] == (0, 0))
    assert len(server.peers) == 3
    assert stale == []  # the pool noticed each close; nothing had to be re-sent


async def test_stale_connection_is_resent_once_on_a_fresh_one(upstreams: Upstreams) -> None:
    """The server's idle close crosses our request: EOF before any byte on a reused connection."""
    stale: list[str] = []

    async def handler(peer: Peer) -> None:
        if await peer.read_request() is None:
            return
        peer.write(ok(b"one"))
        await peer.read_request()  # the next request arrives just as the server closes: never answered

    async def fresh_handler(peer: Peer) -> None:
        await keepalive(peer)

    handlers = iter([handler, fresh_handler])

    async def dispatch(peer: Peer) -> None:
        await next(handlers)(peer)

    server = await upstreams.serve(dispatch)
    client = upstreams.client(on_stale_retry=stale.append)
    assert (await client.fetch(server.url, "GET", "/", timeout=WAIT)).body == b"one"
    got = await client.fetch(server.url, "POST", "/again", body=b"payload", timeout=WAIT)
    assert (got.status, got.body, got.reused) == (200, b"hello", False)
    assert stale == [server.url]
    assert len(server.peers) == 2
    assert server.peers[1].requests[0].endswith(b"payload")


async def test_no_resend_on_a_fresh_connection(upstreams: Upstreams) -> None:
    stale: list[str] = []

    async def handler(peer: Peer) -> None:
        await peer.read_request()  # close without a byte

    server = await upstreams.serve(handler)
    client = upstreams.client(on_stale_retry=stale.append)
    with pytest.raises(ConnectionLost) as caught:
        await client.fetch(server.url, "GET", "/", timeout=WAIT)
    error = caught.value
    assert (error.kind, error.reused, error.got_response_bytes) == ("connection_lost", False, False)
    assert server.url in str(caught.value) and "before responding" in str(caught.value)
    assert stale == [] and len(server.peers) == 1


async def test_no_resend_after_a_response_byte(upstreams: Upstreams) -> None:
    stale: list[str] = []

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(ok())
        await peer.read_request()
        peer.write(b"HTTP/1.1 200")  # a partial head, then close

    server = await upstreams.serve(handler)
    client = upstreams.client(on_stale_retry=stale.append)
    await client.fetch(server.url, "GET", "/", timeout=WAIT)
    with pytest.raises(ConnectionLost) as caught:
        await client.fetch(server.url, "GET", "/", timeout=WAIT)
    assert (caught.value.reused, caught.value.got_response_bytes) == (True, True)
    assert "mid-head" in str(caught.value)
    assert stale == [] and len(server.peers) == 1


async def test_no_resend_after_a_timeout_on_a_reused_connection(upstreams: Upstreams) -> None:
    stale: list[str] = []

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(ok())
        await silent(peer)

    server = await upstreams.serve(handler)
    client = upstreams.client(on_stale_retry=stale.append)
    await client.fetch(server.url, "GET", "/", timeout=WAIT)
    with pytest.raises(ResponseTimeout) as caught:
        await client.fetch(server.url, "GET", "/", timeout=0.1)
    assert caught.value.kind == "timeout" and caught.value.reused
    assert stale == [] and len(server.peers) == 1


# ---- bad responses ----


async def expect_bad(upstreams: Upstreams, reply: bytes, error: type[CallError], options: ClientOptions) -> CallError:
    """The server answers `reply` (then waits); the call fails with `error` and the client closes the socket."""

    server = await upstreams.serve(answer(reply))
    client = upstreams.client(options)
    with pytest.raises(error) as caught:
        await client.fetch(server.url, "GET", "/", timeout=WAIT, max_bytes=1000)
    peer = await server.peer(0)
    async with within(WAIT):
        await peer.closed.wait()
    assert client.stats()[server.url] == (0, 0)
    assert server.url in str(caught.value)
    return caught.value


async def test_garbage_is_bad_response(upstreams: Upstreams) -> None:
    error = await expect_bad(upstreams, b"SSH-2.0-OpenSSH_9.6\r\n\r\n", BadResponse, ClientOptions())
    assert error.kind == "bad_response" and error.got_response_bytes


async def test_invalid_chunk_size_is_bad_response(upstreams: Upstreams) -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
    await expect_bad(upstreams, reply, BadResponse, ClientOptions())


async def test_head_too_large_is_bad_response(upstreams: Upstreams) -> None:
    reply = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000 + b"\r\nContent-Length: 0\r\n\r\n"
    error = await expect_bad(upstreams, reply, BadResponse, ClientOptions(max_header_bytes=1024))
    assert "larger than 1024" in str(error)


async def test_endless_head_is_bad_response_before_it_ends(upstreams: Upstreams) -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + b"X-Line: 0123456789\r\n" * 500  # no blank line ever
    await expect_bad(upstreams, reply, BadResponse, ClientOptions(max_header_bytes=1024))


async def test_body_over_max_bytes_is_too_large(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:  # endless: the client must stop reading, not buffer it all
            peer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            await peer.writer.drain()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    with pytest.raises(ResponseTooLarge) as caught:
        await client.fetch(server.url, "GET", "/", timeout=WAIT, max_bytes=100_000)
    assert caught.value.kind == "too_large"
    peer = await server.peer(0)
    async with within(WAIT):
        await peer.closed.wait()  # the server's writes failed: the socket is gone


async def test_close_mid_headers_is_connection_lost(upstreams: Upstreams) -> None:
    server = await upstreams.serve(answer(b"HTTP/1.1 200 OK\r\nContent-Le", then_close=True))
    with pytest.raises(ConnectionLost, match="mid-head"):
        await upstreams.client().fetch(server.url, "GET", "/", timeout=WAIT)


async def test_close_mid_body_is_connection_lost(upstreams: Upstreams) -> None:
    server = await upstreams.serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", then_close=True))
    client = upstreams.client()
    with pytest.raises(ConnectionLost, match="mid-body") as caught:
        await client.fetch(server.url, "GET", "/", timeout=WAIT)
    assert caught.value.got_response_bytes
    stream = await client.open(server.url, "GET", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    assert stream.first == b"only ten b"
    sink = Sink()
    stream.start(sink)
    async with within(WAIT):
        await sink.failed.wait()
    assert isinstance(sink.error, ConnectionLost) and not sink.ended.is_set()


def live_exchanges() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Exchange))


async def test_ended_exchanges_are_freed_without_the_cyclic_collector(upstreams: Upstreams) -> None:
    """An exchange and its parser refer to each other while the call runs; once it ended (answered, failed or
    streamed to the end) the cycle is broken, so reference counting frees it and its body at once."""
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.startswith(b"GET /garbage"):
                peer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
                return
            peer.write(ok(b"hello"))

    server = await upstreams.serve(handler)
    client = upstreams.client()
    gc.collect()
    gc.disable()  # only reference counting frees what the calls leave behind
    try:
        before = live_exchanges()
        assert (await client.fetch(server.url, "GET", "/", timeout=WAIT)).body == b"hello"
        assert live_exchanges() == before  # freed as the call returned
        stream = await client.open(server.url, "GET", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
        assert stream.first == b"hello"
        sink = Sink()
        stream.start(sink)
        async with within(WAIT):
            await sink.ended.wait()
        assert stream._exchange.sink is None  # a sink that holds its Stream makes no cycle through the exchange
        with pytest.raises(BadResponse):  # the error's traceback may keep its exchange: not its parser
            await client.fetch(server.url, "GET", "/garbage", timeout=WAIT)
        # Whatever still holds an ended exchange (the Stream, a traceback) holds no parser cycle with it.
        assert all(obj.parser is None for obj in gc.get_objects() if isinstance(obj, Exchange))
    finally:
        gc.enable()


# ---- connecting ----


async def test_connect_refused_is_connect_failed(upstreams: Upstreams) -> None:
    url = closed_port_url()
    with pytest.raises(ConnectFailed) as caught:
        await upstreams.client().fetch(url, "GET", "/", timeout=WAIT)
    assert caught.value.kind == "connect_failed"
    assert url in str(caught.value) and "refused" in str(caught.value).lower()


async def test_connect_timeout_against_a_full_backlog(upstreams: Upstreams) -> None:
    """A listener that never accepts, its backlog filled: the kernel drops our SYN, connect hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect(address)
            except BlockingIOError:
                pass
        client = upstreams.client(ClientOptions(connect_timeout=0.2))
        with pytest.raises(ConnectTimeout) as caught:
            await client.fetch(f"http://127.0.0.1:{address[1]}", "GET", "/", timeout=WAIT)
        assert caught.value.kind == "connect_timeout" and "0.2 s" in str(caught.value)
    finally:
        for sock in [*fillers, listener]:
            sock.close()


async def test_max_connections_waits_for_a_free_connection(upstreams: Upstreams) -> None:
    release = asyncio.Event()
    server = await upstreams.serve(held_keepalive(release))
    client = upstreams.client(ClientOptions(max_connections=1, connect_timeout=WAIT))
    first = asyncio.ensure_future(client.fetch(server.url, "GET", "/1", timeout=WAIT))
    second = asyncio.ensure_future(client.fetch(server.url, "GET", "/2", timeout=WAIT))
    await eventually(lambda: bool(server.peers and server.peers[0].requests))
    await asyncio.sleep(0.05)
    assert not second.done() and len(server.peers[0].requests) == 1  # the second waits for the slot
    release.set()
    results = await asyncio.gather(first, second)
    assert [r.reused for r in results] == [False, True]
    assert len(server.peers) == 1


async def test_max_connections_wait_is_bounded_by_connect_timeout(upstreams: Upstreams) -> None:
    server = await upstreams.serve(silent)
    client = upstreams.client(ClientOptions(max_connections=1, connect_timeout=0.1))
    first = asyncio.ensure_future(client.fetch(server.url, "GET", "/", timeout=WAIT))
    await eventually(lambda: bool(server.peers and server.peers[0].requests))
    with pytest.raises(ConnectTimeout, match="max_connections=1"):
        await client.fetch(server.url, "GET", "/", timeout=WAIT)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


# ---- deadlines ----


async def test_first_byte_timeout(upstreams: Upstreams) -> None:
    server = await upstreams.serve(silent)
    client = upstreams.client()
    with pytest.raises(FirstByteTimeout) as caught:
        await client.open(server.url, "POST", "/", body=b"{}", first_byte_timeout=0.1, idle_timeout=WAIT)
    assert caught.value.kind == "first_byte_timeout" and not caught.value.got_response_bytes
    peer = await server.peer(0)
    async with within(WAIT):
        await peer.closed.wait()


async def test_first_byte_timeout_counts_the_first_body_bytes(upstreams: Upstreams) -> None:
    """A head alone is not enough: open() also waits for the first body bytes."""

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await upstreams.serve(answer(head))
    with pytest.raises(FirstByteTimeout) as caught:
        await upstreams.client().open(server.url, "POST", "/", first_byte_timeout=0.1, idle_timeout=WAIT)
    assert caught.value.got_response_bytes


async def test_fetch_overall_timeout_covers_a_slow_body(upstreams: Upstreams) -> None:
    server = await upstreams.serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    with pytest.raises(ResponseTimeout) as caught:
        await upstreams.client().fetch(server.url, "GET", "/", timeout=0.15)
    assert caught.value.got_response_bytes and "0.15 s" in str(caught.value)


async def test_idle_timeout_mid_stream(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        for _ in range(3):  # keeps talking for a while: each chunk pushes the idle deadline
            await asyncio.sleep(0.05)
            peer.write(b"1\r\nx\r\n")
        await peer.wait_eof()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    stream = await client.open(server.url, "POST", "/", first_byte_timeout=WAIT, idle_timeout=0.12)
    sink = Sink()
    stream.start(sink)
    async with within(WAIT):
        await sink.failed.wait()
    assert isinstance(sink.error, IdleTimeout) and sink.error.kind == "idle_timeout"
    assert b"".join(sink.data) == b"xxx"  # the idle timer was pushed by each chunk
    peer = await server.peer(0)
    async with within(WAIT):
        await peer.closed.wait()


# ---- streams ----


async def test_a_streamed_chunk_costs_at_most_one_clock_read(upstreams: Upstreams) -> None:
    """The idle deadline is re-armed lazily: chunks only note the time, the one timer checks it when it fires."""
    reads = 0

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):
            peer.write(b"1\r\nx\r\n")
            await peer.writer.drain()
            await asyncio.sleep(0.002)  # separate reads on the client side
        peer.write(b"0\r\n\r\n")
        await peer.wait_eof()

    loop = asyncio.get_running_loop()

    def clock() -> float:
        nonlocal reads
        reads += 1
        return loop.time()

    server = await upstreams.serve(handler)
    client = upstreams.client(loop_time=clock)
    stream = await client.open(server.url, "GET", "/", first_byte_timeout=WAIT, idle_timeout=0.05)
    sink = Sink()
    reads = 0
    stream.start(sink)
    async with within(WAIT):
        await sink.ended.wait()
    assert sink.error is None  # 2 ms gaps never trip a 50 ms idle deadline
    assert len(sink.data) >= 20  # the chunks really arrived one by one
    assert reads <= len(sink.data) + 10  # one read per chunk, plus a few for timer checks


async def test_stream_of_the_mock_engine(upstreams: Upstreams) -> None:
    engine, runner, url = await start_mock()
    try:
        client = upstreams.client()
        body = orjson.dumps({"model": "mock", "prompt": "hi", "max_tokens": 5, "stream": True})
        stream = await client.open(
            url, "POST", "/v1/completions", headers=b"Content-Type: application/json\r\n", body=body,
            first_byte_timeout=WAIT, idle_timeout=WAIT,
        )
        assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
        assert stream.first
        sink = Sink()
        stream.start(sink)
        async with within(WAIT):
            await sink.ended.wait()
        events = sse_events(stream.first + b"".join(sink.data))
        assert events[-1] == b"[DONE]"
        assert len(events) >= 6  # 5 tokens (+ usage/finish) then [DONE]
        assert client.stats() == {url: (1, 1)}  # on_end: the connection is back in the pool
        assert stream.last_activity > 0
        assert [r.body["prompt"] for r in engine.requests] == ["hi"]
    finally:
        await runner.cleanup()


async def test_stream_complete_at_open(upstreams: Upstreams) -> None:
    server = await upstreams.serve(keepalive)
    client = upstreams.client()
    stream = await client.open(server.url, "GET", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    assert (stream.complete, stream.first) == (True, b"hello")
    assert client.stats() == {server.url: (1, 1)}
    sink = Sink()
    stream.start(sink)
    assert sink.ended.is_set() and sink.data == []
    stream.abort()  # too late: must not touch the pooled connection
    assert client.stats() == {server.url: (1, 1)}
    assert (await client.fetch(server.url, "GET", "/", timeout=WAIT)).reused


async def test_bytes_between_open_and_start_reach_the_sink(upstreams: Upstreams) -> None:
    more = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await more.wait()
        peer.write(b"4\r\nmore\r\n0\r\n\r\n")
        await peer.wait_eof()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    stream = await client.open(server.url, "POST", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    assert (stream.first, stream.complete) == (b"first", False)
    seen = stream.last_activity
    more.set()
    await eventually(lambda: client.stats()[server.url] == (1, 1))  # the message ended before start()
    assert stream.last_activity >= seen  # uvloop's clock ticks in ms
    sink = Sink()
    stream.start(sink)
    assert sink.data == [b"more"] and sink.ended.is_set()
    with pytest.raises(RuntimeError):
        stream.start(Sink())


async def test_read_rest_of_an_error_status(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"er\r\n")
        await peer.writer.drain()
        await asyncio.sleep(0.02)
        peer.write(b"5\r\nror\"}\r\n0\r\n\r\n")
        await peer.wait_eof()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    stream = await client.open(server.url, "POST", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    assert (stream.status, stream.first) == (500, b'{"er')
    assert await stream.read_rest(1000) == b'ror"}'
    assert client.stats() == {server.url: (1, 1)}


async def test_read_rest_over_max_bytes(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5000\r\n\r\n" + b"e" * 10)
        await asyncio.sleep(0.02)
        peer.write(b"e" * 4990)
        await peer.wait_eof()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    stream = await client.open(server.url, "POST", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    with pytest.raises(ResponseTooLarge):
        await stream.read_rest(100)
    assert client.stats()[server.url] == (0, 0)


async def test_pause_stops_reading_and_the_idle_timer(upstreams: Upstreams) -> None:
    blocked = asyncio.Event()
    finish = asyncio.Event()
    buffered: list[int] = []
    chunk = b"x" * 65536

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        peer.write(frame)
        while not blocked.is_set():
            peer.write(frame)
            try:
                async with within(0.2):
                    await peer.writer.drain()
            except asyncio.TimeoutError:
                buffered.append(peer.writer.transport.get_write_buffer_size())
                blocked.set()  # the client stopped reading: our writes pile up
        await finish.wait()
        peer.write(b"0\r\n\r\n")
        await peer.wait_eof()

    server = await upstreams.serve(handler)
    client = upstreams.client()
    stream = await client.open(server.url, "GET", "/", first_byte_timeout=WAIT, idle_timeout=0.15)
    stream.pause()
    sink = Sink()
    stream.start(sink)
    async with within(WAIT):
        await blocked.wait()
    assert buffered[0] > 0
    got_while_paused = sum(map(len, sink.data))
    await asyncio.sleep(0.3)  # twice the idle timeout while paused: the idle timer must not fire
    assert not sink.failed.is_set()
    assert sum(map(len, sink.data)) == got_while_paused  # nothing read while paused
    finish.set()
    stream.resume()
    async with within(WAIT):
        await sink.ended.wait()
    assert sink.error is None
    assert len(stream.first) + sum(map(len, sink.data)) > got_while_paused


# ---- cancellation, abort, close ----


async def test_cancelled_fetch_closes_the_upstream_socket(upstreams: Upstreams) -> None:
    server = await upstreams.serve(silent)
    client = upstreams.client()
    call = asyncio.ensure_future(client.fetch(server.url, "GET", "/", timeout=LONG))
    peer = await server.peer(0)
    await eventually(lambda: bool(peer.requests))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with within(WAIT):
        await peer.closed.wait()  # the server saw EOF
    assert client.stats()[server.url] == (0, 0)


async def test_cancelled_open_and_read_rest_close_the_upstream_socket(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        if len(upstream.peers) == 2:
            await peer.read_request()
            peer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\nfirst")
        await silent(peer)

    upstream = await upstreams.serve(handler)
    client = upstreams.client()
    call = asyncio.ensure_future(client.open(upstream.url, "GET", "/", first_byte_timeout=LONG, idle_timeout=LONG))
    first = await upstream.peer(0)
    await eventually(lambda: bool(first.requests))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with within(WAIT):
        await first.closed.wait()
    stream = await client.open(upstream.url, "GET", "/", first_byte_timeout=LONG, idle_timeout=LONG)
    rest = asyncio.ensure_future(stream.read_rest(1000))
    await asyncio.sleep(0)
    rest.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rest
    second = await upstream.peer(1)
    async with within(WAIT):
        await second.closed.wait()
    assert client.stats()[upstream.url] == (0, 0)


async def test_abort_closes_the_socket_and_stops_callbacks(upstreams: Upstreams) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        while not (peer.reader.at_eof() or peer.writer.is_closing()):
            await asyncio.sleep(0.01)
            peer.write(b"1\r\nb\r\n")

    server = await upstreams.serve(handler)
    client = upstreams.client()
    stream = await client.open(server.url, "POST", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    sink = Sink()
    stream.start(sink)
    await eventually(lambda: len(sink.data) >= 2)
    stream.abort()
    seen = len(sink.data)
    peer = await server.peer(0)
    async with within(WAIT):
        await peer.closed.wait()
    assert len(sink.data) == seen and not sink.failed.is_set() and not sink.ended.is_set()
    assert client.stats()[server.url] == (0, 0)


async def test_close_fails_in_flight_calls_and_refuses_new_ones(upstreams: Upstreams) -> None:
    server = await upstreams.serve(keepalive)
    hanging = await upstreams.serve(silent)
    client = upstreams.client()
    await client.fetch(server.url, "GET", "/", timeout=WAIT)
    call = asyncio.ensure_future(client.fetch(hanging.url, "GET", "/", timeout=WAIT))
    peer = await hanging.peer(0)
    await eventually(lambda: bool(peer.requests))
    await client.close()
    with pytest.raises(ClientClosed):
        await call
    async with within(WAIT):
        await server.peers[0].closed.wait()  # the idle connection was closed too
        await peer.closed.wait()
    with pytest.raises(ClientClosed):
        await client.fetch(server.url, "GET", "/", timeout=WAIT)
    with pytest.raises(ClientClosed):
        await client.open(closed_port_url(), "GET", "/", first_byte_timeout=WAIT, idle_timeout=WAIT)
    assert client.stats() == {server.url: (0, 0), hanging.url: (0, 0)}


async def test_invalid_upstream_url_and_path(upstreams: Upstreams) -> None:
    client = upstreams.client()
    with pytest.raises(ValueError, match="unsupported upstream URL"):
        await client.fetch("ftp://127.0.0.1:1", "GET", "/", timeout=WAIT)
    server = await upstreams.serve(keepalive)
    with pytest.raises(ValueError, match="invalid request target"):
        await client.fetch(server.url, "GET", "/a b\r\nX: y", timeout=WAIT)
