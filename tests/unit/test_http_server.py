"""pdproxy.http.server over loopback: raw sockets for protocol misbehaviour, aiohttp/openai/curl as real clients.

Every scenario runs on the default asyncio loop and on uvloop (the `run` fixture).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from yarl import URL

if sys.version_info >= (3, 11):
    from asyncio import timeout as time_limit
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as time_limit

from pdproxy.errors import InvalidRequest, Unavailable
from pdproxy.http.limits import LARGE_BODY_BYTES, ServerLimits
from pdproxy.http.request import Request
from pdproxy.http.response import Response, json_response
from pdproxy.http.router import Router
from pdproxy.http.server import Server, start_server

uvloop = pytest.importorskip("uvloop")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run one scenario on a fresh loop of the parametrised kind, bounded; fails if it leaves tasks behind."""

    def runner(scenario: Coroutine[Any, Any, Any], timeout: float = 5.0) -> Any:
        loop = LOOPS[request.param]()
        fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None  # loop's own included
        try:
            result = loop.run_until_complete(asyncio.wait_for(scenario, timeout))
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            assert not leftover, f"tasks left running: {leftover}"
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        if fds is not None:
            assert len(os.listdir("/proc/self/fd")) <= fds, "file descriptors leaked"
        return result

    return runner


@dataclass
class Probe:
    """What the test handlers saw; events let a test wait on them instead of sleeping."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    order: list[str] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    events: list[tuple[str, str | None, int]] = field(default_factory=list)
    event_seen: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, reason: str, request: Request | None, status: int) -> None:
        self.events.append((reason, None if request is None else request.path, status))
        self.event_seen.set()

    async def wait_event(self, reason: str, timeout: float = 1.5) -> tuple[str, str | None, int]:
        async def seen() -> tuple[str, str | None, int]:
            while True:
                for event in self.events:
                    if event[0] == reason:
                        return event
                self.event_seen.clear()
                await self.event_seen.wait()

        return await asyncio.wait_for(seen(), timeout)


def make_router(probe: Probe) -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        probe.order.append(request.query().get("i", ""))
        probe.running += 1
        probe.max_running = max(probe.max_running, probe.running)
        await asyncio.sleep(0)  # a real await inside the handler: the next pipelined one must still wait
        probe.running -= 1
        return json_response({"method": request.method, "path": request.path, "query": request.query(),
                              "version": request.version, "body": request.body.decode("latin-1"),
                              "x_test": request.headers.get("X-TEST"), "match": request.match_info})

    async def slow(request: Request) -> Response:
        probe.started.set()
        try:
            await asyncio.wait_for(probe.release.wait(), 3)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return json_response({"slow": True})

    async def stream(request: Request) -> None:
        count = int(request.query().get("n", "3"))
        out = request.start_stream(200, [("Content-Type", "text/event-stream")])
        for i in range(count):
            out.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0)
        assert out.ends_on_event_boundary()
        out.end()

    async def flood(request: Request) -> None:
        """Writes 256 KiB pieces, waiting for on_drain while paused, until cancelled."""
        out = request.start_stream(200, [("Content-Type", "application/octet-stream")])
        piece = b"x" * 256 * 1024
        probe.started.set()
        try:
            while True:
                out.write(piece)
                if out.paused:
                    drained = asyncio.get_running_loop().create_future()
                    out.on_drain = lambda f=drained: f.done() or f.set_result(None)
                    probe.order.append("paused")
                    await drained
                    probe.order.append("drained")
                if out.bytes_written > 8 * 1024 * 1024:
                    break
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        out.end()

    async def boom(request: Request) -> Response:
        raise RuntimeError("handler bug")

    async def boom_stream(request: Request) -> None:
        out = request.start_stream(200, [("Content-Type", "text/event-stream")])
        out.write(b"data: 1\n\n")
        raise RuntimeError("handler bug mid-stream")

    async def refuse(request: Request) -> Response:
        raise Unavailable("no decode upstream", retry_after=3)

    async def refuse_stream(request: Request) -> None:
        out = request.start_stream(200, [("Content-Type", "text/event-stream")])
        out.write(b"data: 1\n\n")
        raise Unavailable("decode died")

    async def big(request: Request) -> Response:
        return Response(body=b"y" * 200_000, content_type="application/octet-stream")

    async def digest(request: Request) -> Response:
        body = request.body
        return json_response({"size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                              "type": type(body).__name__})

    router.add("GET", "/echo", echo)
    router.add("POST", "/echo", echo)
    router.add("GET", "/items/{item}/parts/{part}", echo)
    router.add("GET", "/slow", slow)
    router.add("POST", "/slow", slow)
    router.add("GET", "/stream", stream)
    router.add("GET", "/flood", flood)
    router.add("GET", "/boom", boom)
    router.add("GET", "/boom-stream", boom_stream)
    router.add("GET", "/refuse", refuse)
    router.add("GET", "/refuse-stream", refuse_stream)
    router.add("GET", "/big", big)
    router.add("POST", "/digest", digest)
    return router


@asynccontextmanager
async def serve(probe: Probe | None = None, **limits: Any) -> AsyncIterator[tuple[Server, Probe]]:
    probe = probe or Probe()
    server = await start_server(make_router(probe), "127.0.0.1", 0, limits=ServerLimits(**limits),
                                on_event=probe.on_event)
    try:
        yield server, probe
    finally:
        await server.close()
        assert server.connections == 0
        assert server.requests == 0
        assert server.budget.used == 0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 1.5) -> Reply:
    """One response, framed by Content-Length, chunked encoding or EOF."""

    async def read() -> Reply:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, value = line.split(":", 1)
                headers[name.lower()] = value.strip()
        if status == 100 or "content-length" in headers:
            return Reply(status, headers, await reader.readexactly(int(headers.get("content-length", 0))))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    return Reply(status, headers, body)
                body += chunk[:-2]
        return Reply(status, headers, await reader.read())

    return await asyncio.wait_for(read(), timeout)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 1.5) -> bytes:
    """Everything left until the server closes (a reset counts as closed); fails if it stays open."""
    data = b""
    try:
        async with time_limit(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data



async def exchange(server: Server, raw: bytes) -> tuple[Reply, bytes]:
    """Send raw bytes on a fresh connection; the first reply and whatever follows until the server closes."""
    reader, writer = await connect(server)
    writer.write(raw)
    try:
        reply = await read_reply(reader)
        rest = await closed_by_server(reader)
    finally:
        writer.close()
    return reply, rest


def error_of(reply: Reply) -> dict[str, Any]:
    body = reply.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- basics ---------------------------------------------------------------------------------------------------


def test_routes_query_headers_and_match_info_with_aiohttp(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, _), aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/echo?a=1&b=x%20y", headers={"x-test": "hi"}) as resp:
                assert resp.status == 200
                data = await resp.json()
                assert data["query"] == {"a": "1", "b": "x y"}
                assert data["x_test"] == "hi"
            async with session.post(f"{server.url}/echo", data=b"payload") as resp:
                assert (await resp.json())["body"] == "payload"
            async with session.get(f"{server.url}/items/7/parts/b") as resp:
                assert (await resp.json())["match"] == {"item": "7", "part": "b"}
            async with session.get(URL(f"{server.url}/items/http%3A%2F%2Fh%3A1/parts/b", encoded=True)) as resp:
                assert (await resp.json())["match"] == {"item": "http://h:1", "part": "b"}
            async with session.get(f"{server.url}/nowhere") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["message"] == "unknown route: GET /nowhere"
            async with session.delete(f"{server.url}/echo") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "GET, POST"
            async with session.get(f"{server.url}/stream?n=4") as resp:
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert await resp.read() == b"".join(b"data: %d\n\n" % i for i in range(4))
            async with session.get(f"{server.url}/big") as resp:
                assert len(await resp.read()) == 200_000
            assert server.connections == 1  # all of it over one keep-alive connection

    run(scenario())


def test_keep_alive_rules_http10_and_connection_close(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, _):
            reader, writer = await connect(server)
            for _ in range(3):  # HTTP/1.1: persistent by default
                writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = await read_reply(reader)
                assert reply.status == 200 and "connection" not in reply.headers
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_reply(reader)).headers["connection"] == "close"
            assert await closed_by_server(reader) == b""
            writer.close()

            reply, rest = await exchange(server, b"GET /echo HTTP/1.0\r\n\r\n")  # 1.0 closes by default
            assert reply.status == 200 and reply.json()["version"] == "1.0" and rest == b""

            reader, writer = await connect(server)
            writer.write(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await read_reply(reader)).headers["connection"] == "keep-alive"
            writer.write(b"GET /stream?n=2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            reply = await read_reply(reader)  # a 1.0 stream is close-delimited
            assert reply.body == b"data: 0\n\ndata: 1\n\n" and "transfer-encoding" not in reply.headers
            writer.close()

    run(scenario())


def test_pipelined_50_requests_in_one_write_answered_in_order(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"".join(b"GET /echo?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(50)))
            for i in range(50):
                reply = await read_reply(reader)
                assert reply.json()["query"] == {"i": str(i)}
            assert probe.order == [str(i) for i in range(50)]
            assert probe.max_running == 1  # one handler at a time per connection
            writer.close()

    run(scenario())


def test_a_half_closed_client_is_a_gone_client(run: Callable[..., Any]) -> None:
    """A FIN while the handler runs cancels it (as nginx, Envoy and uvicorn read it): no vanished client keeps
    upstream work running."""
    async def scenario() -> None:
        async with serve() as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            writer.write_eof()  # like nc -N / shutdown(SHUT_WR)
            await asyncio.wait_for(probe.cancelled.wait(), 1)
            assert await probe.wait_event("client_closed") == ("client_closed", "/slow", 499)
            assert await closed_by_server(reader) == b""
            writer.close()

    run(scenario())


def test_answer_half_closed_answers_then_closes(run: Callable[..., Any]) -> None:
    """answer_half_closed: a FIN after a complete request is a half-close: the running handler is not cancelled,
    its answer says Connection: close, then the server closes. The proxy-level tests are in
    tests/functional/test_half_close.py."""
    async def scenario() -> None:
        async with serve(answer_half_closed=True) as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            writer.write_eof()
            await asyncio.sleep(0.05)  # the FIN reaches the server while /slow runs (not a correctness wait)
            assert not probe.cancelled.is_set()
            probe.release.set()
            reply = await read_reply(reader)
            assert reply.json() == {"slow": True} and reply.headers["connection"] == "close"
            assert await closed_by_server(reader) == b""
            assert [e for e in probe.events if e[0] == "client_closed"] == []
            writer.close()

    run(scenario())


def test_answer_half_closed_still_closes_on_a_fin_inside_a_body(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(answer_half_closed=True) as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            writer.write_eof()  # the request can never complete: nothing to answer
            assert await closed_by_server(reader) == b""
            assert await probe.wait_event("client_closed") == ("client_closed", "/echo", 499)
            writer.close()

    run(scenario())


def test_client_disconnect_cancels_the_handler(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # reset: connection_lost
            await asyncio.wait_for(probe.cancelled.wait(), 1)
            assert await probe.wait_event("client_closed") == ("client_closed", "/slow", 499)
            # serve()'s exit checks requests, connections and the budget are back to zero

    run(scenario())


def test_eof_in_the_middle_of_a_body_closes_and_releases_the_budget(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            writer.write_eof()
            assert await closed_by_server(reader) == b""
            assert await probe.wait_event("client_closed") == ("client_closed", "/echo", 499)
            assert server.budget.used == 0
            writer.close()

    run(scenario())


# ---- request bodies -------------------------------------------------------------------------------------------


def test_chunked_body_with_extensions_and_trailers(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, _):
            reader, writer = await connect(server)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
            assert (await read_reply(reader)).json()["body"] == "hello world"
            writer.close()

    run(scenario())


def test_large_bodies_arrive_whole_in_one_buffer(run: Callable[..., Any]) -> None:
    """A body of LARGE_BODY_BYTES or more (Content-Length or chunked) is read into one growing bytearray, byte
    for byte; a small one stays the bytes the read gave (the hot path is unchanged)."""
    size = LARGE_BODY_BYTES + 123_457
    body = os.urandom(size)
    want = hashlib.sha256(body).hexdigest()

    async def scenario() -> None:
        async with serve() as (server, _):
            reader, writer = await connect(server)
            writer.write(b"POST /digest HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            for start in range(0, size, 300_001):
                writer.write(body[start:start + 300_001])
                await writer.drain()
            assert (await read_reply(reader, 5)).json() == {"size": size, "sha256": want, "type": "bytearray"}

            writer.write(b"POST /digest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, size, 65_536):
                piece = body[start:start + 65_536]
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            assert (await read_reply(reader, 5)).json() == {"size": size, "sha256": want, "type": "bytearray"}

            writer.write(b"POST /digest HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            assert (await read_reply(reader)).json() == {
                "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest(), "type": "bytes"}
            writer.close()

    run(scenario())


def test_expect_100_continue(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(max_body_bytes=1000) as (server, _):
            reader, writer = await connect(server)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            assert (await read_reply(reader)).status == 100
            writer.write(b"hello")
            assert (await read_reply(reader)).json()["body"] == "hello"
            writer.close()

            reply, rest = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                                                 b"Expect: 100-continue\r\n\r\n")
            assert reply.status == 413 and rest == b""  # no 100 first

            reply, _ = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                              b"Expect: teapot\r\n\r\nhello")
            assert reply.status == 417 and error_of(reply)["param"] == "Expect"

    run(scenario())


def test_body_limits_on_content_length_and_on_chunked(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(max_body_bytes=100) as (server, probe):
            reply, _ = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
            assert reply.status == 413 and reply.headers["connection"] == "close"
            chunk = b"40\r\n" + b"z" * 64 + b"\r\n"
            reply, _ = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                              b"\r\n" + chunk * 2)
            assert reply.status == 413
            assert [e for e in probe.events if e[0] == "too_large"] == [("too_large", "/echo", 413)] * 2

    run(scenario())


def test_gzip_and_deflate_bodies_are_decoded_and_bombs_refused(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(max_body_bytes=10_000) as (server, _), aiohttp.ClientSession() as session:
            for encoding, data in (("gzip", gzip.compress(b"zipped")), ("deflate", zlib.compress(b"zipped")),
                                   ("identity", b"zipped")):
                async with session.post(f"{server.url}/echo", data=data,
                                        headers={"Content-Encoding": encoding}) as resp:
                    assert (await resp.json())["body"] == "zipped", encoding
            bomb = gzip.compress(b"\0" * 10_000_000)
            async with session.post(f"{server.url}/echo", data=bomb, headers={"Content-Encoding": "gzip"}) as resp:
                assert resp.status == 413
            async with session.post(f"{server.url}/echo", data=b"not gzip at all",
                                    headers={"Content-Encoding": "gzip"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["message"] == "the request body is not valid gzip"
            async with session.post(f"{server.url}/echo", data=b"x", headers={"Content-Encoding": "br"}) as resp:
                assert resp.status == 415

    run(scenario())


def test_body_budget_refuses_the_body_that_does_not_fit(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(body_budget_bytes=1000) as (server, probe):
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"
            streams = [await connect(server) for _ in range(3)]
            for _, writer in streams:
                writer.write(head)  # bodies promised, not sent yet: the budget is held
            third = await read_reply(streams[2][0])
            assert third.status == 503 and third.headers["retry-after"] == "1"
            assert error_of(third)["type"] == "service_unavailable"
            assert await probe.wait_event("body_budget") == ("body_budget", "/echo", 503)
            reply, _ = await exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                              b"Connection: close\r\n\r\nok")
            assert reply.json()["body"] == "ok"  # a small request still fits
            for reader, writer in streams[:2]:
                writer.write(b"b" * 400)
                assert len((await read_reply(reader)).json()["body"]) == 400
            assert server.budget.used == 0
            for _, writer in streams:
                writer.close()

    run(scenario())


# ---- malformed input -----------------------------------------------------------------------------------------

# Every malformed and smuggling shape, and the 431 limits, are tested through the real proxy (with engines that
# must see nothing) in tests/functional/test_malformed_http.py, on both loops. Here: the server's own sides.


def test_malformed_warnings_are_rate_limited(run: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serve() as (server, _):
            for _ in range(5):
                reply, _ = await exchange(server, b"BROKEN\r\n\r\n")
                assert reply.status == 400

    with caplog.at_level(logging.WARNING, logger="pdproxy.http"):
        run(scenario())
    assert len(caplog.records) == 1


def test_malformed_request_pipelined_behind_a_running_handler(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
            await asyncio.sleep(0.05)  # the bad bytes arrive while the handler runs (not a correctness wait)
            probe.release.set()
            first = await read_reply(reader)
            assert first.status == 200 and "connection" not in first.headers
            second = await read_reply(reader)
            assert second.status == 400 and second.headers["connection"] == "close"
            assert await closed_by_server(reader) == b""
            writer.close()

    run(scenario())


# ---- handler failures -----------------------------------------------------------------------------------------


def test_handler_exceptions(run: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serve() as (server, _):
            reader, writer = await connect(server)
            writer.write(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await read_reply(reader)
            assert reply.status == 500 and error_of(reply)["type"] == "internal_error"
            writer.write(b"GET /refuse HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection survived
            reply = await read_reply(reader)
            assert reply.status == 503 and reply.headers["retry-after"] == "3"
            assert error_of(reply)["message"] == "no decode upstream"
            writer.write(b"GET /boom-stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1)
            assert head.startswith(b"HTTP/1.1 200 ")
            rest = await closed_by_server(reader)
            assert rest == b"9\r\ndata: 1\n\n\r\n"  # the chunk, then a close: never a second response
            writer.close()
            reader, writer = await connect(server)
            writer.write(b"GET /refuse-stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await closed_by_server(reader) == b"9\r\ndata: 1\n\n\r\n"  # a ProxyError after the head: close
            writer.close()

    with caplog.at_level(logging.ERROR, logger="pdproxy.http"):
        run(scenario())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info for r in errors)


# ---- timeouts ---------------------------------------------------------------------------------------------------


def test_slowloris_head_is_cut_by_header_timeout(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(header_timeout=0.3) as (server, probe):
            reader, writer = await connect(server)
            loop = asyncio.get_running_loop()
            start = loop.time()

            async def trickle() -> None:
                for piece in b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ":
                    writer.write(bytes([piece]))
                    await asyncio.sleep(0.05)

            trickler = asyncio.ensure_future(trickle())
            data = await closed_by_server(reader)
            elapsed = loop.time() - start
            trickler.cancel()
            await asyncio.gather(trickler, return_exceptions=True)
            assert 0.25 <= elapsed < 1.0
            assert data.startswith(b"HTTP/1.1 408 ")
            assert await probe.wait_event("header_timeout") == ("header_timeout", None, 408)
            writer.close()

            reader, writer = await connect(server)  # connect and say nothing: closed silently
            assert await closed_by_server(reader) == b""
            writer.close()

    run(scenario())


def test_slow_body_is_cut_by_body_timeout(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(body_timeout=0.3) as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(3):  # reads closer together than body_timeout keep it alive
                writer.write(b"x" * 10)
                await asyncio.sleep(0.15)
            data = await closed_by_server(reader)
            assert loop.time() - start >= 0.55
            assert data.startswith(b"HTTP/1.1 408 ")
            assert await probe.wait_event("body_timeout") == ("body_timeout", "/echo", 408)
            writer.close()

    run(scenario())


def test_idle_keep_alive_closed_silently(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(keepalive_timeout=0.2, header_timeout=5) as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_reply(reader)
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await closed_by_server(reader) == b""
            assert 0.15 <= loop.time() - start < 1.0
            assert await probe.wait_event("keepalive_timeout") == ("keepalive_timeout", None, 0)
            writer.close()

    run(scenario())


def test_send_timeout_closes_a_client_that_never_reads(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(send_timeout=0.3) as (server, probe):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            sock.send(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.wait_for(probe.cancelled.wait(), 1.5)
            assert loop.time() - start < 1.0
            assert "paused" in probe.order and "drained" not in probe.order
            assert await probe.wait_event("send_timeout") == ("send_timeout", "/flood", 200)
            assert not [e for e in probe.events if e[0] == "client_closed"]
            sock.close()

    run(scenario())


def test_back_pressure_pauses_and_drains_for_a_reading_client(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe), aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/flood") as resp:
                total = 0
                async for chunk in resp.content.iter_chunked(65536):
                    total += len(chunk)
                assert total > 8 * 1024 * 1024
            assert "paused" in probe.order and "drained" in probe.order

    run(scenario())


# ---- connection limits and lifecycle ------------------------------------------------------------------------------


def test_max_connections_refuses_the_sixth(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(max_connections=5) as (server, probe):
            held = [await connect(server) for _ in range(5)]
            for reader, writer in held:  # each is accepted and served
                writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await read_reply(reader)).status == 200
            reply, _ = await exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.status == 503 and reply.headers["retry-after"] == "1"
            assert reply.headers["connection"] == "close"
            assert error_of(reply)["type"] == "service_unavailable"
            assert await probe.wait_event("max_connections") == ("max_connections", None, 503)
            assert server.connections == 5
            for _, writer in held:
                writer.close()

    run(scenario())


def test_drain_closes_idle_now_and_lets_in_progress_finish(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            idle_reader, idle_writer = await connect(server)
            idle_writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_reply(idle_reader)
            busy_reader, busy_writer = await connect(server)
            busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            drain = asyncio.ensure_future(server.drain(timeout=2))
            assert await closed_by_server(idle_reader) == b""
            probe.release.set()
            reply = await read_reply(busy_reader)
            assert reply.status == 200 and reply.headers["connection"] == "close"
            await asyncio.wait_for(drain, 1)
            with pytest.raises(OSError):
                await connect(server)
            idle_writer.close()
            busy_writer.close()

    run(scenario())


def test_drain_timeout_closes_what_is_left(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            _reader, writer = await connect(server)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            await server.drain(timeout=0.2)
            assert probe.cancelled.is_set()
            assert server.connections == 0 and server.requests == 0
            writer.close()

    run(scenario())


# ---- real clients -----------------------------------------------------------------------------------------------


def test_openai_client_streamed_and_not(run: Callable[..., Any]) -> None:
    async def completions(request: Request) -> Response | None:
        body = orjson.loads(request.body)
        if not body.get("stream"):
            return json_response({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}]})
        out = request.start_stream(200, [("Content-Type", "text/event-stream")])
        for text in ("a", "b", "c"):
            event = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}
            out.write(b"data: " + orjson.dumps(event) + b"\n\n")
        out.write(b"data: [DONE]\n\n")
        out.end()
        return None

    async def bad(request: Request) -> Response:
        raise InvalidRequest("max_tokens must be positive", param="max_tokens")

    async def scenario() -> None:
        router = Router()
        router.add("POST", "/v1/completions", completions)
        router.add("POST", "/v1/chat/completions", bad)
        server = await start_server(router, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        try:
            done = await client.completions.create(model="m", prompt="x")
            assert done.choices[0].text == "hi"
            stream = await client.completions.create(model="m", prompt="x", stream=True)
            assert [c.choices[0].text async for c in stream] == ["a", "b", "c"]
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            assert caught.value.param == "max_tokens"
        finally:
            await client.close()
            await server.close()

    run(scenario())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_chunked_upload_expect_and_keep_alive(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, _):
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                "--data-binary", "hello curl", f"{server.url}/echo", "--next", f"{server.url}/echo?i=2",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 3)
            assert proc.returncode == 0, err
            first, second = out.split(b"}{")
            assert orjson.loads(first + b"}")["body"] == "hello curl"
            assert orjson.loads(b"{" + second)["query"] == {"i": "2"}

    run(scenario())


def test_a_handler_cancelled_before_its_first_step_still_gives_everything_back(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_reply(reader)
            (conn,) = server._conns
            # the race, made deterministic: a request and the client's reset handled in one loop iteration,
            # so the handler task is cancelled before its coroutine ever ran
            conn.data_received(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert server.requests == 1 and server.budget.used == 3
            conn.connection_lost(ConnectionResetError())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert server.requests == 0 and server.budget.used == 0
            assert probe.order == [""]  # only the first request's handler ran
            writer.close()

    run(scenario())


def test_upgrade_and_absolute_form_requests(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, _):
            reply, rest = await exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                                 b"Upgrade: websocket\r\n\r\nframes")
            assert reply.status == 200 and reply.headers["connection"] == "close" and rest == b""
            reader, writer = await connect(server)
            writer.write(b"GET http://example.com/echo?i=4 HTTP/1.1\r\nHost: example.com\r\n\r\n")
            reply = await read_reply(reader)
            assert reply.json()["path"] == "/echo" and reply.json()["query"] == {"i": "4"}
            writer.close()

    run(scenario())


def test_the_server_and_the_error_tree_need_no_aiohttp() -> None:
    code = "import sys, pdproxy.errors, pdproxy.http.server; assert 'aiohttp' not in sys.modules, 'aiohttp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_chunked_bodies_take_the_budget_as_they_arrive(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve(body_budget_bytes=1000) as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + (b"100\r\n" + b"c" * 256 + b"\r\n") * 3)
            other_reader, other_writer = await connect(server)
            other_writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n")
            reply = await read_reply(other_reader)  # 768 held by the chunked body: 300 more do not fit
            assert reply.status == 503 and reply.headers["retry-after"] == "1"
            writer.write(b"0\r\n\r\n")
            assert len((await read_reply(reader)).json()["body"]) == 768
            assert [e[0] for e in probe.events] == ["body_budget"]
            writer.close()
            other_writer.close()

    run(scenario())


def test_the_pipeline_buffer_is_bounded_while_a_handler_runs(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            _reader, writer = await connect(server)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            request = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
            writer.write(request * (32 * 1024 * 1024 // len(request)))  # 32 MiB: more than the kernel buffers
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(writer.drain(), 0.5)  # the server stopped reading
            (conn,) = server._conns
            assert len(conn._queue) <= 256 * 1024 // len(request) + 1  # at most one socket read of requests
            writer.transport.abort()

    run(scenario())


def test_100_continue_for_a_pipelined_request_waits_for_the_answer_before_it(run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with serve() as (server, probe):
            reader, writer = await connect(server)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(probe.started.wait(), 1)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            with pytest.raises(asyncio.TimeoutError):  # nothing may interleave with the running answer
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.2)
            probe.release.set()
            assert (await read_reply(reader)).status == 200
            assert (await read_reply(reader)).status == 100
            writer.write(b"hello")
            assert (await read_reply(reader)).json()["body"] == "hello"
            writer.close()

    run(scenario())


def test_a_pre_bound_socket_and_a_plain_handler(run: Callable[..., Any]) -> None:
    async def handler(request: Request) -> Response:
        return json_response({"path": request.path}, headers=[("X-Served-By", "sock")])

    async def scenario() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # as the workers supervisor reserves the port
        server = await start_server(handler, "ignored", 0, sock=sock)
        try:
            assert server.url == f"http://127.0.0.1:{sock.getsockname()[1]}"
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/any/path") as resp:
                assert resp.headers["X-Served-By"] == "sock"
                assert (await resp.json())["path"] == "/any/path"
        finally:
            await server.close()

    run(scenario())
