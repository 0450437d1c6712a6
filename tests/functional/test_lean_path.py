"""The lean data path end to end: keep-alive safety, back-pressure, send timeout, and HTTP clients of
every kind (pipelined, HTTP/1.0, Expect), through the real proxy to real upstream servers."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
import orjson
import pytest
from aiohttp import web

from pdproxy.mock import MockConfig, MockEngine
from tests.conftest import Cluster, ClusterFactory, sse_events

COMPLETION = {"model": "mock", "prompt": "hello there", "max_tokens": 4}


def raw_request(body: dict, *, path: str = "/v1/completions", version: str = "1.1", extra: str = "") -> bytes:
    data = orjson.dumps(body)
    return (f"POST {path} HTTP/{version}\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length, chunked, or to EOF) from a raw stream."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).split(b";")[0], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 5)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    return status, headers, body


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length body, as a raw upstream server reads it; its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return await reader.readexactly(length)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# ---------------------------------------------------------------- keep-alive safety


class ClosesOnReuse:
    """A prefill server that answers the first request of a connection and closes the connection when a second
    one arrives on it, before any byte: what a server closing an idle connection does as a request goes out."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                body = orjson.loads(await read_request(reader))
                if served:
                    return  # closed, no answer: the stale keep-alive race
                answer = orjson.dumps({"choices": [{"text": "x", "index": 0}], "kv_transfer_params": None,
                                       "echo": body.get("prompt")})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_stale_keepalive_connection_is_retried_once_and_never_blamed(
        cluster_factory: ClusterFactory) -> None:
    prefill = ClosesOnReuse()
    server = await asyncio.start_server(prefill.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        cluster = await cluster_factory(n_prefill=0, extra_prefill=(url,), eject_after=1, health_interval=0)
        async with aiohttp.ClientSession() as http:
            for i in range(4):
                async with http.post(cluster.url + "/v1/completions", json={**COMPLETION, "prompt": f"p{i}"}) as r:
                    assert r.status == 200, await r.text()
        assert prefill.answered == 4
        assert prefill.connections >= 4  # every reuse failed and went on a fresh connection
        assert cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=url,
                              outcome="stale_retry") >= 3
        assert cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=url, outcome="ok") == 4
        assert cluster.upstream(url).state.value in ("unknown", "healthy")  # eject_after=1: one strike would eject
        assert cluster.metric("pdproxy_prefill_retries_total") == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_upstreams_closing_idle_connections_fast_cost_no_request(cluster_factory: ClusterFactory) -> None:
    """Engines whose keep-alive is shorter than the proxy's pool expiry (here 0.15 s against 4 s)."""
    runners = []
    urls = []
    engines = []
    for role in ("prefill", "decode"):
        engine = MockEngine(MockConfig(role=role))
        runner = web.AppRunner(engine.make_app(), keepalive_timeout=0.15)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        engines.append(engine)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        cluster = await cluster_factory(n_prefill=0, n_decode=0, extra_prefill=(urls[0],), extra_decode=(urls[1],),
                                        eject_after=1, health_interval=0)
        async with aiohttp.ClientSession() as http:
            for i in range(6):
                async with http.post(cluster.url + "/v1/completions",
                                     json={**COMPLETION, "prompt": f"q{i}", "stream": i % 2 == 0}) as resp:
                    assert resp.status == 200
                    await resp.read()
                await asyncio.sleep(0.1 + 0.02 * i)  # around the engines' keep-alive: some reuse, some expire
        for url in urls:
            assert cluster.metric("pdproxy_upstream_requests_total", role="prefill" if url == urls[0] else "decode",
                                  upstream=url, outcome="ok") == 6
            assert cluster.upstream(url).state.value in ("unknown", "healthy")
        assert cluster.metric("pdproxy_flow_retries_total") == 0
        assert cluster.metric("pdproxy_prefill_retries_total") == 0
    finally:
        for runner in runners:
            await runner.cleanup()


# ---------------------------------------------------------------- back-pressure and the send timeout


class FloodingDecode:
    """A decode server that streams `total` bytes of SSE as fast as the proxy takes them, and records how
    long its writes were held back (the proxy paused reading)."""

    def __init__(self, total: int, event: int = 64 * 1024) -> None:
        self.total = total
        self.event = b"data: {\"x\":\"" + b"a" * (event - 16) + b"\"}\n\n"
        self.longest_wait = 0.0
        self.finished = asyncio.Event()
        self.closed_early = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            sent = 0
            chunk = b"%x\r\n%s\r\n" % (len(self.event), self.event)
            while sent < self.total:
                writer.write(chunk)
                sent += len(self.event)
                started = time.monotonic()
                await writer.drain()
                self.longest_wait = max(self.longest_wait, time.monotonic() - started)
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_early = True
        finally:
            self.finished.set()
            writer.close()


async def start_raw(handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def slow_client(url: str, body: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose socket has a small receive buffer; it reads only when told to."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, host_port(url))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(raw_request(body))
    return reader, writer


async def test_a_slow_reader_pauses_decode_and_is_never_blamed_on_it(cluster_factory: ClusterFactory) -> None:
    decode = FloodingDecode(total=50 * 1024 * 1024)
    server, url = await start_raw(decode.handle)
    try:
        cluster = await cluster_factory(n_decode=0, extra_decode=(url,), stream_idle_timeout=0.3, eject_after=1,
                                        health_interval=0)
        reader, writer = await slow_client(cluster.url, {**COMPLETION, "stream": True})
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.9)  # the client stops reading for 3 x the idle timeout: D is held back, not idle
        assert not decode.finished.is_set()
        received = 0
        while True:
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not data:
                break
            received += len(data)
            if data.endswith(b"0\r\n\r\n"):
                break
        writer.close()
        assert received > 50 * 1024 * 1024
        await asyncio.wait_for(decode.finished.wait(), 5)
        assert not decode.closed_early
        assert decode.longest_wait > 0.5  # the proxy stopped reading D while the client did not read
        assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=url, outcome="ok") == 1
        assert cluster.metric("pdproxy_timeouts_total", stage="stream_idle") == 0
        assert cluster.upstream(url).state.value in ("unknown", "healthy")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_that_never_reads_is_ended_by_the_send_timeout(cluster_factory: ClusterFactory) -> None:
    decode = FloodingDecode(total=200 * 1024 * 1024)
    server, url = await start_raw(decode.handle)
    try:
        cluster = await cluster_factory(n_decode=0, extra_decode=(url,), send_timeout=0.4, eject_after=1,
                                        health_interval=0)
        _reader, writer = await slow_client(cluster.url, {**COMPLETION, "stream": True})
        started = time.monotonic()
        await asyncio.wait_for(decode.finished.wait(), 5)  # the proxy gave up on the client and closed D
        assert time.monotonic() - started < 3
        assert decode.closed_early
        await asyncio.wait_for(cluster.flow.wait_idle(), 5)
        writer.close()
        assert cluster.metric("pdproxy_requests_total", endpoint="/v1/completions", status="499") == 1
        assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=url,
                              outcome="cancelled") == 1
        assert cluster.upstream(url).last_error is None  # the client's fault, never D's
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- HTTP clients of every kind


async def test_pipelined_requests_are_answered_in_order(cluster: Cluster) -> None:
    reader, writer = await asyncio.open_connection(*host_port(cluster.url))
    bodies = [{**COMPLETION, "prompt": f"pipelined {i}", "stream": i % 2 == 1} for i in range(6)]
    writer.write(b"".join(raw_request(body, extra=f"X-Request-Id: pipe-{i}\r\n") for i, body in enumerate(bodies)))
    for i, body in enumerate(bodies):
        status, headers, payload = await read_response(reader)
        assert status == 200
        assert headers["x-request-id"] == f"pipe-{i}"
        if body["stream"]:
            assert sse_events(payload)[-1] == b"[DONE]"
        else:
            assert orjson.loads(payload)["choices"][0]["text"]
    writer.close()


async def test_an_http_1_0_client_gets_a_whole_answer_then_a_close(cluster: Cluster) -> None:
    for stream in (False, True):
        reader, writer = await asyncio.open_connection(*host_port(cluster.url))
        writer.write(raw_request({**COMPLETION, "stream": stream}, version="1.0"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
        assert b"chunked" not in head.lower()  # HTTP/1.0 knows no chunked encoding
        rest = await asyncio.wait_for(reader.read(), 5)  # ends with the connection
        if stream:
            assert sse_events(rest)[-1] == b"[DONE]"
        else:
            assert orjson.loads(rest)["choices"]
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body(cluster: Cluster) -> None:
    reader, writer = await asyncio.open_connection(*host_port(cluster.url))
    data = orjson.dumps(COMPLETION)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n".encode())
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(data)
    status, _, payload = await read_response(reader)
    assert status == 200 and orjson.loads(payload)["choices"]
    writer.close()


async def test_a_client_gone_after_the_first_chunk_is_a_disconnect_not_an_error(
        cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=1))
    reader, writer = await asyncio.open_connection(*host_port(cluster.url))
    writer.write(raw_request({**COMPLETION, "max_tokens": 200, "stream": True}))
    await asyncio.wait_for(reader.readuntil(b"data: "), 5)
    writer.transport.abort()  # RST while the relay writes
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    await cluster.decode[0].wait_until(lambda stats: stats.aborted == 1)  # D was told: its connection closed
    assert cluster.metric("pdproxy_requests_total", endpoint="/v1/completions", status="499") == 1
    assert cluster.metric("pdproxy_client_disconnects_total", stage="decode") == 1
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=cluster.decode_urls[0],
                          outcome="cancelled") == 1


# ---------------------------------------------------------------- client-side limits, wired


async def test_refusals_by_the_server_are_counted_and_logged(cluster_factory: ClusterFactory,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cluster = await cluster_factory(client_header_timeout=0.3, access_log=True, max_body_bytes=4096)
    caplog.set_level(logging.INFO, logger="pdproxy.access")
    reader, writer = await asyncio.open_connection(*host_port(cluster.url))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: p\r\n")  # ... and the rest never comes (slowloris)
    status, _, payload = await read_response(reader)
    assert status == 408 and orjson.loads(payload)["error"]["code"] == 408
    writer.close()
    async with aiohttp.ClientSession() as http:
        async with http.post(cluster.url + "/v1/completions", data=b"x" * 10_000) as resp:
            assert resp.status == 413
    assert cluster.metric("pdproxy_client_refusals_total", reason="header_timeout") == 1
    assert cluster.metric("pdproxy_client_refusals_total", reason="too_large") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "pdproxy.access"]
    assert any(" 408 " in line and "header_timeout" in line for line in lines), lines
    assert any(" 413 " in line and "too_large" in line for line in lines), lines


async def test_a_stream_cut_mid_event_gets_its_error_event_on_a_boundary(cluster_factory: ClusterFactory) -> None:
    """D dies in the middle of an SSE event: the client's last event is a whole JSON error, not glued to the
    half-written one."""

    async def half_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        whole, half = b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [{"te'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (len(whole), whole))
        await writer.drain()
        await asyncio.sleep(0.05)  # two reads on the proxy's side: the half event arrives on its own
        writer.write(b"%x\r\n%s\r\n" % (len(half), half))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    server, url = await start_raw(half_then_die)
    try:
        cluster = await cluster_factory(n_decode=0, extra_decode=(url,), health_interval=0)
        async with aiohttp.ClientSession() as http:
            async with http.post(cluster.url + "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
                assert resp.status == 200
                body = await resp.read()
        events = [e for e in body.split(b"\n\n") if e]
        assert events[0] == b'data: {"choices": [{"text": "a"}]}'
        assert events[1] == b'data: {"choices": [{"te'  # relayed as it came
        error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
        assert "decode stream broke" in error["message"]
    finally:
        server.close()
        await server.wait_closed()
