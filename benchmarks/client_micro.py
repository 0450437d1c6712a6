"""Upstream-client micro-benchmark: CPU per call of pdproxy.client vs aiohttp.ClientSession.

    flock /tmp/pdproxy-heavy.lock python benchmarks/client_micro.py            # ~20 s on 2 cores
    python benchmarks/client_micro.py --calls 5000 --concurrency 32 --repeat 5

Keep-alive POSTs with a 600-byte JSON body against a raw upstream (asyncio Protocol + httptools on uvloop)
that answers each request with a fixed ~300-byte JSON response. The upstream runs in its own process, so
`time.process_time()` in this process counts only the client's CPU. For each client, sequential calls (one at a
time) and concurrent calls (`--concurrency` tasks sharing the calls) run `--repeat` times after a warm-up; the
best (lowest) CPU µs per call is reported, with the wall-clock rate. Results go to
benchmarks/results/client_micro.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress import Progress

from pdproxy.client import ClientOptions, UpstreamClient

RESULTS = Path(__file__).resolve().parent / "results"
REQUEST_BODY = json.dumps({"model": "mock", "prompt": "x" * 540, "max_tokens": 1, "stream": False}).encode()
RESPONSE_BODY = json.dumps(
    {"id": "cmpl-1", "object": "text_completion", "model": "mock",
     "choices": [{"index": 0, "text": "a", "finish_reason": "length"}],
     "usage": {"prompt_tokens": 128, "completion_tokens": 1, "total_tokens": 129},
     "kv_transfer_params": {"remote_engine_id": "e" * 32, "remote_block_ids": [1, 2, 3, 4]}}
).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"date: Tue, 01 Dec 2026 00:00:00 GMT\r\nserver: uvicorn\r\n\r\n%s" % (len(RESPONSE_BODY), RESPONSE_BODY)
)


class _Upstream(asyncio.Protocol):
    """Answers every complete request with RESPONSE (parses with httptools, like uvicorn)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(RESPONSE)


def _serve(sock: socket.socket) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, sock=sock)
        await server.serve_forever()

    uvloop.run(main())


async def _run_pdproxy(url: str, calls: int, concurrency: int) -> tuple[float, float, int]:
    client = UpstreamClient(ClientOptions())
    try:
        return await _drive(
            lambda: client.fetch(url, "POST", "/v1/completions", headers=b"Content-Type: application/json\r\n",
                                 body=REQUEST_BODY, timeout=10.0),
            calls, concurrency,
        )
    finally:
        await client.close()


async def _run_aiohttp(url: str, calls: int, concurrency: int) -> tuple[float, float, int]:
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        target = f"{url}/v1/completions"
        headers = {"Content-Type": "application/json"}

        async def one() -> bytes:
            async with session.post(target, data=REQUEST_BODY, headers=headers) as response:
                return await response.read()

        return await _drive(one, calls, concurrency)


async def _drive(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, calls) of `calls` calls spread over `concurrency` tasks, after a warm-up."""
    for _ in range(50):  # warm-up: connections open, code paths hot
        await call()
    per_task = calls // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    started = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - started, time.perf_counter() - wall, per_task * concurrency


def measure(name: str, url: str, calls: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs per call, calls per wall second) of one run in a fresh uvloop loop."""
    runner = _run_pdproxy if name == "pdproxy.client" else _run_aiohttp
    cpu, wall, done = uvloop.run(runner(url, calls, concurrency))
    return cpu / done * 1e6, done / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000, help="calls per run (default 4000)")
    parser.add_argument("--concurrency", type=int, default=16, help="tasks in the concurrent runs (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client and mode; the best counts")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(sock,), daemon=True)
    server.start()
    sock.close()

    clients = ("pdproxy.client", "aiohttp")
    modes = (("sequential", 1), ("concurrent", args.concurrency))
    progress = Progress(len(clients) * len(modes) * args.repeat, "client_micro", not args.no_progress, unit="run")
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for mode, concurrency in modes:
            for name in clients:
                runs = []
                for _ in range(args.repeat):  # interleaving is per mode; the best run filters neighbours' noise
                    runs.append(measure(name, url, args.calls, concurrency))
                    progress.update()
                cpu, rate = min(runs)
                results.setdefault(mode, {})[name] = {"cpu_us_per_call": round(cpu, 1), "calls_per_s": round(rate)}
    finally:
        progress.close()
        server.terminate()
        server.join(5)

    meta = {
        "calls": args.calls, "concurrency": args.concurrency, "repeat": args.repeat, "loop": "uvloop",
        "request_body_bytes": len(REQUEST_BODY), "response_body_bytes": len(RESPONSE_BODY),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__, "httptools": httptools.__version__,
        "cpus": os.cpu_count(),
    }
    lines = [
        "# Upstream client micro-benchmark (CPU µs per keep-alive POST, lower is better)", "",
        f"{args.calls} calls per run, best of {args.repeat}, uvloop, {len(REQUEST_BODY)}-byte request body, "
        f"Python {meta['python']}, aiohttp {meta['aiohttp']}, httptools {meta['httptools']}", "",
        "| mode | pdproxy.client µs/call | aiohttp µs/call | aiohttp / pdproxy | pdproxy calls/s | aiohttp calls/s |",
        "|---|---|---|---|---|---|",
    ]
    for mode, by_client in results.items():
        ours, theirs = by_client["pdproxy.client"], by_client["aiohttp"]
        label = mode if mode == "sequential" else f"{mode} ×{args.concurrency}"
        lines.append(
            f"| {label} | {ours['cpu_us_per_call']} | {theirs['cpu_us_per_call']} | "
            f"{theirs['cpu_us_per_call'] / ours['cpu_us_per_call']:.2f}× | {ours['calls_per_s']} | "
            f"{theirs['calls_per_s']} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "client_micro.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (RESULTS / "client_micro.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
