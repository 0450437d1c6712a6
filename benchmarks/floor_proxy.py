"""The floor: a bare PD proxy on raw asyncio protocols, for the benchmarks only. NOT A PRODUCT.

It does the least a vLLM NIXL PD proxy can do: parse the client's request (httptools) and its JSON
body (orjson), prefill on P (round robin, keep-alive), copy P's `kv_transfer_params` into D's body,
and write D's body chunks to the client's transport straight from `data_received`. No error
handling, health, metrics, timeouts, limits or back-pressure: every report shows how far pdproxy,
which has all of those, is from this floor.

    python benchmarks/floor_proxy.py --prefill URL[,URL] --decode URL[,URL] --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from collections import deque
from urllib.parse import urlsplit

import httptools
import orjson

PREFILL_BLOCK = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection to an engine; one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: StreamSink | None = None  # set per request: the client's stream, or None (read whole)
        self.done: asyncio.Future | None = None
        self.chunks: list[bytes] = []
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed"))

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_headers_complete(self) -> None:
        if self.sink is not None:
            self.sink.head(self.status)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.body(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        done, self.done = self.done, None
        if self.sink is not None:
            self.sink.end()
        self.pool.idle.append(self)
        if done is not None and not done.done():
            done.set_result(b"".join(self.chunks))
        self.chunks = []

    def send(self, head: bytes, body: bytes, sink: StreamSink | None) -> asyncio.Future:
        self.sink = sink
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.done


class Pool:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.host_line = f"Host: {self.host}:{self.port}\r\n".encode()
        self.idle: deque[UpstreamConn] = deque()

    async def get(self) -> UpstreamConn:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(lambda: UpstreamConn(self), self.host, self.port)
        return conn


class StreamSink:
    """D's stream to the client: chunked framing, written from data_received."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def head(self, status: int) -> None:
        self.client.write(b"HTTP/1.1 %d OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                          % status)

    def body(self, data: bytes) -> None:
        self.client.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self) -> None:
        self.client.write(b"0\r\n\r\n")


class ClientConn(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Future[None] | None = None  # the request being answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path, body, self.url, self.body = self.url, b"".join(self.body), b"", []
        self.task = asyncio.ensure_future(self.proxy.handle(self, path, body))


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        self.prefill = itertools.cycle([Pool(u) for u in prefill])
        self.decode = itertools.cycle([Pool(u) for u in decode])

    async def handle(self, client: ClientConn, path: bytes, raw: bytes) -> None:
        transport = client.transport
        assert transport is not None
        body = orjson.loads(raw)
        rid = os.urandom(16).hex().encode()
        prefill = {k: v for k, v in body.items() if k != "stream_options"}
        prefill.update(stream=False, max_tokens=1, kv_transfer_params=PREFILL_BLOCK)
        head = b"POST %s HTTP/1.1\r\n%%sContent-Type: application/json\r\nX-Request-Id: %s\r\n" % (path, rid)
        p = next(self.prefill)
        conn = await p.get()
        answer = orjson.loads(await conn.send(head.replace(b"%s", p.host_line, 1), orjson.dumps(prefill), None))
        decode = {**body, "kv_transfer_params": answer.get("kv_transfer_params")}
        d = next(self.decode)
        conn = await d.get()
        if body.get("stream"):
            await conn.send(head.replace(b"%s", d.host_line, 1), orjson.dumps(decode), StreamSink(transport))
        else:
            whole = await conn.send(head.replace(b"%s", d.host_line, 1), orjson.dumps(decode), None)
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(whole), whole))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", required=True)
    parser.add_argument("--decode", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    proxy = Proxy(args.prefill.split(","), args.decode.split(","))
    server = await asyncio.get_running_loop().create_server(lambda: ClientConn(proxy), args.host, args.port,
                                                           backlog=2048)
    port = server.sockets[0].getsockname()[1]
    print(f"floor proxy listening on http://{args.host}:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
