"""Server CPU per request: pdproxy.http.server against aiohttp's web server, same handler, same client.

    flock /tmp/pdproxy-heavy.lock python benchmarks/http_server.py --requests 20000 --connections 32

Each server runs in its own process on uvloop (127.0.0.1, port 0) with one JSON handler (a 600-byte POST body,
parsed with orjson, a small JSON answer, or a 20-event SSE stream with --stream). The client (this process) drives
it with keep-alive raw-socket connections, one request in flight per connection; the server's CPU time (user +
sys, from /proc) over the measured requests is the number. Prints one JSON line per server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time

BODY = json.dumps({"model": "m", "prompt": "x" * 500, "max_tokens": 16, "stream": False}).encode()
EVENTS = 20


def serve(kind: str, stream: bool, port_queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import orjson
    import uvloop

    async def main() -> None:
        if kind == "pdproxy":
            from pdproxy.http.response import json_response
            from pdproxy.http.router import Router
            from pdproxy.http.server import start_server

            async def handler(request):  # type: ignore[no-untyped-def]
                body = orjson.loads(request.body)
                if stream:
                    out = request.start_stream(200, [("Content-Type", "text/event-stream")])
                    for i in range(EVENTS):
                        out.write(b'data: {"i": %d}\n\n' % i)
                    out.end()
                    return None
                return json_response({"id": "cmpl", "model": body["model"], "text": "ok"})

            router = Router()
            router.add("POST", "/v1/completions", handler)
            server = await start_server(router, "127.0.0.1", 0)
            port_queue.put(server.port)
        else:
            from aiohttp import web

            async def handler(request):  # type: ignore[no-untyped-def]
                body = orjson.loads(await request.read())
                if stream:
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                    await response.prepare(request)
                    for i in range(EVENTS):
                        await response.write(b'data: {"i": %d}\n\n' % i)
                    await response.write_eof()
                    return response
                return web.Response(body=orjson.dumps({"id": "cmpl", "model": body["model"], "text": "ok"}),
                                    content_type="application/json")

            app = web.Application()
            app.router.add_post("/v1/completions", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port_queue.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    uvloop.run(main())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, requests: int, connections: int) -> float:
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    left = requests
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if b"Content-Length:" in head:
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            else:
                await reader.readuntil(b"0\r\n\r\n")
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    import uvloop

    for kind in ("aiohttp", "pdproxy"):
        queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
        proc = multiprocessing.Process(target=serve, args=(kind, args.stream, queue), daemon=True)
        proc.start()
        try:
            port = queue.get(timeout=30)
            uvloop.run(drive(port, 500, args.connections))  # warm-up
            before = cpu_seconds(proc.pid)  # type: ignore[arg-type]
            wall = uvloop.run(drive(port, args.requests, args.connections))
            cpu = cpu_seconds(proc.pid) - before  # type: ignore[arg-type]
            print(json.dumps({"server": kind, "stream": args.stream, "requests": args.requests,
                              "server_cpu_s": round(cpu, 3), "cpu_us_per_request": round(cpu / args.requests * 1e6, 1),
                              "requests_per_s": round(args.requests / wall)}))
        finally:
            proc.terminate()
            proc.join(5)


if __name__ == "__main__":
    main()
