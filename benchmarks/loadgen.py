"""A bounded load generator for an OpenAI-compatible endpoint, or for mock P/D engines directly.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 64
    python benchmarks/loadgen.py --direct-pd P1,P2 --decode D --requests 2000   # no proxy: the floor

Closed loop (the default): exactly --requests requests (never more) from --concurrency workers,
stopping at --max-seconds whatever is left; prints one JSON line: requests, errors by kind,
throughput, and p50/p90/p99 of TTFT, end-to-end latency and inter-token gaps, output tokens.
With --direct-pd the generator does what a PD proxy does itself (prefill on P, round robin, then
decode on D with P's kv_transfer_params and the same X-Request-Id): the floor of any PD proxy.

`--warmup N --wait-go` (used by benchmarks/harness.py): N unmeasured requests first, then the line
{"event": "warm"} on stdout, then the measured run once a line arrives on stdin.

`--hold-streams` (the S4 scale workload): holds many open streams, driven by JSON lines on stdin
({"cmd": "open", "target": N, "rate": R}, {"cmd": "stats"}, {"cmd": "close"}) and answering with
JSON lines on stdout. It stops by itself at --max-seconds or when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import aiohttp

try:
    import orjson

    dumps = orjson.dumps
    loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a pdproxy dependency
    def dumps(obj: Any) -> bytes:  # type: ignore[misc]
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads  # type: ignore[assignment]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import raise_nofile_limit
from progress import Progress
from report import summarize

JSON = {"Content-Type": "application/json"}
DONE = b"data: [DONE]\n\n"
# The prefill request's NIXL block, as vLLM's toy proxy sends it.
KV_REQUEST = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
VARIANTS = 64  # prompt bodies, cycled (each request's prompt is also made unique by its first word)
MARK = "@@ID@@"
MARK_BYTES = MARK.encode()


class Failed(Exception):
    """A request that got an answer, but not a good one; `str()` is its error kind."""


def bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, Failed):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} errno {exc.errno}"
    return type(exc).__name__


class Client:
    """What one request does: through a proxy (`url`), or the PD flow itself (`prefill`, `decode`).

    Every prompt is unique (it starts with the request's own id), so no engine or router cache
    ever holds it: each prefill costs the same. The rest of the body is encoded once.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.stream = not args.no_stream
        self.prefill = [u.rstrip("/") + "/v1/completions" for u in args.direct_pd.split(",")] if args.direct_pd else []
        decode = args.decode.split(",") if args.direct_pd else [args.url]
        self.decode = [u.rstrip("/") + "/v1/completions" for u in decode]
        self.bodies: list[dict[str, Any]] = []
        for i in range(VARIANTS):
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(max(0, args.prompt_words - 1))]
            self.bodies.append({"model": args.model, "prompt": " ".join(words), "max_tokens": args.max_tokens,
                                "stream": self.stream})
        self.templates = [dumps({**b, "prompt": f"{MARK} {b['prompt']}"}) for b in self.bodies]
        self.prefill_templates = [
            dumps({**b, "prompt": f"{MARK} {b['prompt']}", "stream": False, "max_tokens": 1,
                   "kv_transfer_params": KV_REQUEST})
            for b in self.bodies]
        self.tag = f"lg{os.getpid()}x"
        self.count = itertools.count()

    async def send(self, http: aiohttp.ClientSession, prefill_http: aiohttp.ClientSession) -> Any:
        """Start the client-facing request (after the prefill, in direct-PD mode); returns the response context."""
        n = next(self.count)
        v = n % VARIANTS
        rid = f"{self.tag}{n}"
        if not self.prefill:
            return http.post(self.decode[0], data=self.templates[v].replace(MARK_BYTES, rid.encode(), 1),
                             headers=JSON)
        headers = {**JSON, "X-Request-Id": rid}
        async with prefill_http.post(self.prefill[n % len(self.prefill)], headers=headers,
                                     data=self.prefill_templates[v].replace(MARK_BYTES, rid.encode(), 1)) as answer:
            raw = await answer.read()
            if answer.status != 200:
                raise Failed(f"prefill status {answer.status}")
        kv = loads(raw).get("kv_transfer_params")
        body = {**self.bodies[v], "prompt": f"{rid} {self.bodies[v]['prompt']}"}
        if kv:
            body["kv_transfer_params"] = kv
        return http.post(self.decode[n % len(self.decode)], data=dumps(body), headers=headers)


class Stats:
    """Everything measured in one phase of a closed-loop run."""

    def __init__(self) -> None:
        self.ttft = array("d")
        self.e2e = array("d")
        self.gaps = array("d")
        self.tokens = 0
        self.errors: dict[str, int] = {}
        self.done = 0


async def read_stream(resp: aiohttp.ClientResponse, gaps: array, on_first: Any = None) -> tuple[float, int, bool]:
    """Read an SSE body to its end; record the gap before every event. Returns (first_event_time, events, ok)."""
    first = 0.0
    last = 0.0
    events = 0
    ended_nl = False
    tail = b""
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            break
        now = time.perf_counter()
        n = chunk.count(b"\n\n") + (1 if ended_nl and chunk[:1] == b"\n" else 0)
        ended_nl = chunk[-1:] == b"\n"
        if n:
            if events == 0:
                first = now
                if on_first is not None:
                    on_first()
                n_gaps = n - 1
            else:
                gaps.append(now - last)
                n_gaps = n - 1
            for _ in range(n_gaps):  # events that arrived in the same read as the one before
                gaps.append(0.0)
            last = now
            events += n
        tail = (tail + chunk)[-512:] if len(chunk) < 512 else chunk[-512:]
    ok = tail.endswith(DONE)
    if not ok and b'"error"' in tail:
        raise Failed("SSE error event")
    return first, events, ok


async def one_request(client: Client, http: aiohttp.ClientSession, prefill_http: aiohttp.ClientSession,
                      stats: Stats) -> None:
    start = time.perf_counter()
    try:
        async with await client.send(http, prefill_http) as resp:
            if resp.status != 200:
                await resp.read()
                raise Failed(f"status {resp.status}")
            if client.stream:
                gaps = array("d")
                first, events, ok = await read_stream(resp, gaps)
                if not ok:
                    raise Failed("incomplete stream")
                stats.gaps.extend(gaps)
                stats.tokens += max(0, events - 1)  # the last event is [DONE]
                stats.ttft.append(first - start)
            else:
                first_bytes = await resp.content.readany()
                stats.ttft.append(time.perf_counter() - start)
                raw = first_bytes + await resp.read()
                usage = loads(raw).get("usage") or {}
                stats.tokens += int(usage.get("completion_tokens", 0))
            stats.e2e.append(time.perf_counter() - start)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure is counted by kind, none stops the run
        bump(stats.errors, error_kind(exc))
    stats.done += 1


async def closed_phase(client: Client, http: aiohttp.ClientSession, prefill_http: aiohttp.ClientSession,
                       total: int, concurrency: int, max_seconds: float,
                       progress: Progress | None) -> tuple[Stats, float]:
    """`total` requests from `concurrency` workers, none started after `max_seconds`; returns (stats, seconds)."""
    stats = Stats()
    issued = 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            issued += 1
            await one_request(client, http, prefill_http, stats)
            if progress is not None:
                progress.update(1)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, total))]
    # In-flight requests get a grace period past the deadline, then they are cut and counted.
    _done, pending = await asyncio.wait(workers, timeout=max_seconds + 30)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        stats.errors["cut at time limit"] = len(pending)
    return stats, time.perf_counter() - started


def sessions(args: argparse.Namespace) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.connect_timeout, sock_read=args.read_timeout)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False), timeout=timeout,
                                 auto_decompress=False)
    # Prefill answers are short: a bounded pool of kept-alive connections is what a proxy would hold.
    prefill_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.prefill_pool), timeout=timeout,
                                         auto_decompress=False)
    return http, prefill_http


def result(stats: Stats, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = len(stats.e2e)
    ttft, e2e, gaps = summarize(stats.ttft), summarize(stats.e2e), summarize(stats.gaps)
    return {
        "requests": stats.done,
        "ok": ok,
        "errors": sum(stats.errors.values()),
        "error_kinds": stats.errors,
        "seconds": round(seconds, 3),
        "requests_per_second": round(ok / seconds, 2) if seconds > 0 else 0.0,
        "output_tokens": stats.tokens,
        "output_tokens_per_second": round(stats.tokens / seconds, 1) if seconds > 0 else 0.0,
        "ttft_ms": ttft,
        "e2e_ms": e2e,
        "itl_ms": gaps,
        # flat keys, as the first version of this script printed them
        "ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"], "e2e_p50_ms": e2e["p50"], "e2e_p99_ms": e2e["p99"],
        "concurrency": args.concurrency,
        "stream": not args.no_stream,
    }


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    client = Client(args)
    http, prefill_http = sessions(args)
    try:
        if args.warmup:
            await closed_phase(client, http, prefill_http, args.warmup, args.concurrency, args.max_seconds, None)
        if args.wait_go:
            emit({"event": "warm"})
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if not line:
                raise SystemExit("stdin closed before go")
        progress = Progress(args.requests, args.label, enabled=args.progress)
        try:
            stats, seconds = await closed_phase(client, http, prefill_http, args.requests, args.concurrency,
                                                args.max_seconds, progress)
        finally:
            progress.close()
        return result(stats, seconds, args)
    finally:
        await http.close()
        await prefill_http.close()


# ------------------------------------------------------------------------------------------ S4: held streams


class StreamHolder:
    """Opens streams up to a target and keeps them open, reading every token, until told to close."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = Client(args)
        self.http, self.prefill_http = sessions(args)
        self.tasks: set[asyncio.Task[None]] = set()
        self.attempts = 0
        self.opening = 0
        self.open = 0
        self.failed: dict[str, int] = {}  # never opened
        self.dropped: dict[str, int] = {}  # opened, then ended before we closed it
        self.open_times = array("d")
        self.gaps = array("d")
        self.closing = False
        self.wake = asyncio.Event()

    async def hold_one(self) -> None:
        """One stream: open it (the first token within --open-timeout), then read it until cancelled."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        start = time.perf_counter()
        opened = False
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            if not opened and task is not None:
                timed_out = True
                task.cancel()

        def on_first() -> None:
            nonlocal opened
            opened = True
            watchdog.cancel()
            self.opening -= 1
            self.open += 1
            self.open_times.append(time.perf_counter() - start)
            self.wake.set()

        watchdog = loop.call_later(self.args.open_timeout, expire)
        outcome: str | None = None
        try:
            async with await self.client.send(self.http, self.prefill_http) as resp:
                if resp.status != 200:
                    await resp.read()
                    raise Failed(f"status {resp.status}")
                _first, events, ok = await read_stream(resp, self.gaps, on_first)
            raise Failed("stream finished before close" if ok else "stream ended early" if events else "empty stream")
        except asyncio.CancelledError:
            if not timed_out:  # closed by us: not an error
                self.account(opened, None)
                raise
            outcome = "open timeout"
        except Exception as exc:
            outcome = error_kind(exc)
        finally:
            watchdog.cancel()
        self.account(opened, outcome)

    def account(self, opened: bool, outcome: str | None) -> None:
        if opened:
            self.open -= 1
        else:
            self.opening -= 1
        if outcome is not None and not self.closing:
            bump(self.dropped if opened else self.failed, outcome)
        self.wake.set()

    async def open_to(self, target: int, rate: float) -> dict[str, Any]:
        """Start attempts until `target` in total (paced at `rate`/s, at most --max-opening at once) and wait
        until each has opened or failed, or --step-timeout passes."""
        started = time.perf_counter()
        deadline = started + self.args.step_timeout
        first_attempt = self.attempts
        progress_at = 0.0
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            due = first_attempt + int((now - started) * rate) + 1
            while self.attempts < min(target, due) and self.opening < self.args.max_opening:
                self.attempts += 1
                self.opening += 1
                task = asyncio.ensure_future(self.hold_one())
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            if self.attempts >= target and self.opening == 0:
                break
            if now - progress_at >= 0.5:
                progress_at = now
                emit({"event": "progress", "open": self.open, "failed": sum(self.failed.values()),
                      "attempts": self.attempts})
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.02)
        return {"event": "opened", "open": self.open, "opening": self.opening, "attempts": self.attempts,
                "failed": dict(self.failed), "dropped": dict(self.dropped),
                "seconds": round(time.perf_counter() - started, 3), "open_ms": self.take(self.open_times)}

    def take(self, values: array) -> list[float]:
        """Up to 20,000 values in ms (a random sample past that), and clear them."""
        out = [round(v * 1000, 3) for v in values]
        del values[:]
        if len(out) > 20000:
            out = random.sample(out, 20000)
        return out

    def stats(self) -> dict[str, Any]:
        tokens = len(self.gaps)  # tokens received since the last report, first tokens aside
        return {"event": "stats", "open": self.open, "opening": self.opening, "failed": dict(self.failed),
                "dropped": dict(self.dropped), "tokens": tokens, "gaps_ms": self.take(self.gaps)}

    async def close(self) -> dict[str, Any]:
        self.closing = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.http.close()
        await self.prefill_http.close()
        return {"event": "closed", "attempts": self.attempts, "failed": self.failed, "dropped": self.dropped}


async def hold_streams(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    holder = StreamHolder(args)
    emit({"event": "ready", "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))})
    deadline = time.monotonic() + args.max_seconds
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                break  # the time bound: stop by ourselves
            if not line:
                break  # stdin closed: the harness is gone
            cmd = json.loads(line)
            if cmd["cmd"] == "open":
                emit(await holder.open_to(int(cmd["target"]), float(cmd.get("rate", 2000))))
            elif cmd["cmd"] == "stats":
                emit(holder.stats())
            elif cmd["cmd"] == "close":
                break
    finally:
        emit(await holder.close())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the system under test (a proxy)")
    parser.add_argument("--direct-pd", metavar="P_URLS", help="comma list of prefill URLs: no proxy in between")
    parser.add_argument("--decode", metavar="D_URLS", help="comma list of decode URLs, with --direct-pd")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--model", default="mock")
    parser.add_argument("--max-seconds", type=float, default=120, help="no request starts after this")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--connect-timeout", type=float, default=10)
    parser.add_argument("--read-timeout", type=float, default=60, help="longest wait for any read")
    parser.add_argument("--prefill-pool", type=int, default=256, help="direct PD: kept-alive prefill connections")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests first")
    parser.add_argument("--wait-go", action="store_true", help='print {"event":"warm"}, wait for a stdin line')
    parser.add_argument("--progress", action="store_true", help="progress bar on stderr")
    parser.add_argument("--label", default="requests", help="progress bar label")
    parser.add_argument("--hold-streams", action="store_true", help="S4 mode, driven by JSON lines on stdin")
    parser.add_argument("--open-timeout", type=float, default=15, help="S4: seconds from request to first token")
    parser.add_argument("--step-timeout", type=float, default=40, help="S4: longest wait for one step to open")
    parser.add_argument("--max-opening", type=int, default=256, help="S4: streams being opened at once")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if bool(args.direct_pd) != bool(args.decode):
        parser.error("--direct-pd and --decode go together")
    raise_nofile_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    else:
        runner = uvloop.run
    if args.hold_streams:
        runner(hold_streams(args))
    else:
        emit(runner(run(args)))


if __name__ == "__main__":
    main()
