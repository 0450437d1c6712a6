"""A bounded soak of pdproxy (issue 15 item 8): mixed load with a fault injected every 30 s; do RSS and fds stay flat?

    python3 benchmarks/soak.py                 # 10 minutes (run it under the heavy lock on a shared machine)
    python3 benchmarks/soak.py --minutes 1     # shorter

The proxy is its own process (`python -m pdproxy`, measured from /proc); 2 prefill and 2 decode mock engines run
in this process, so faults are scripted straight on them (kill and restart on the same port, 500s, hangs, a
stream that dies mid-way). The load is a closed loop of `--concurrency` clients mixing non-streamed and streamed
completions and chat, slow readers and clients that disconnect on purpose.

RSS and open fds of the proxy are read when it is idle (load paused, in-flight 0, client connections closed)
after a warm-up, and again at the end the same way: "flat" means RSS grew by at most 10% + 8 MiB and fds by at
most 8 (pooled upstream connections come and go). The report (Markdown + JSON, in --out) gives requests,
failures by cause and by the fault active when they happened, the samples taken every fault period, and the
proxy's in-flight gauges and ERROR lines at the end. Every process and port is loopback; everything stops by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import processes  # noqa: E402

from pdproxy.mock import MockConfig, MockEngine, start_mock  # noqa: E402

RSS_SLACK = (1.10, 8 * 1024)  # end RSS <= start * 1.10 + 8 MiB (KiB)
FD_SLACK = 8
REQUEST_TIMEOUT = 30.0  # a client gives up after this (a hang the proxy did not bound would show here)
KINDS = (("plain", 30), ("chat", 10), ("stream", 30), ("slow_reader", 15), ("disconnect", 15))
PROXY_ARGS = (  # short timeouts so a hung engine costs seconds, fast health so a killed one comes back quickly
    "--health-interval", "1", "--health-timeout", "0.5", "--health-rise", "1", "--connect-timeout", "1",
    "--prefill-timeout", "3", "--decode-first-byte-timeout", "3", "--stream-idle-timeout", "3",
    "--eject-base-time", "5", "--eject-max-time", "10", "--no-access-log",
)


@dataclass(slots=True)
class Engine:
    """One mock engine this process runs; `kill` and `restart` keep its port (the proxy's membership is static)."""

    role: str
    config: MockConfig
    url: str
    engine: MockEngine
    runner: web.AppRunner | None

    async def kill(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    async def restart(self) -> None:
        if self.runner is None:
            port = int(self.url.rsplit(":", 1)[1])
            self.engine, self.runner, _ = await start_mock(self.config, port=port)


@dataclass(slots=True)
class Tally:
    """What the load saw; `fault` is the fault active when a request ended."""

    requests: int = 0
    ok: int = 0
    disconnects: int = 0  # intended: the client left on purpose
    kinds: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    failures_by_fault: Counter[str] = field(default_factory=Counter)
    fault: str = "none"
    longest_s: float = 0.0

    def record(self, kind: str, outcome: str, seconds: float) -> None:
        self.requests += 1
        self.kinds[kind] += 1
        self.longest_s = max(self.longest_s, seconds)
        if outcome == "ok":
            self.ok += 1
        elif outcome == "disconnect":
            self.disconnects += 1
        else:
            self.failures[outcome] += 1
            self.failures_by_fault[f"{self.fault}: {outcome}"] += 1


def body_for(kind: str, rng: random.Random, n: int) -> tuple[str, dict[str, Any]]:
    prompt = f"soak request {n} " + " ".join(rng.choice(("alpha", "beta", "gamma", "delta")) for _ in range(48))
    stream = kind in ("stream", "slow_reader") or (kind == "disconnect" and rng.random() < 0.7)
    if kind == "chat":
        return "/v1/chat/completions", {"model": "mock", "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": 16, "stream": rng.random() < 0.5}
    return "/v1/completions", {"model": "mock", "prompt": prompt, "max_tokens": 32, "stream": stream}


async def one_request(http: aiohttp.ClientSession, url: str, kind: str, rng: random.Random, n: int) -> str:
    """Send one request of this kind; its outcome: ok, disconnect (intended) or the cause of a failure."""
    path, body = body_for(kind, rng, n)
    async with http.post(url + path, json=body) as resp:
        if kind == "disconnect":
            if body["stream"]:
                await resp.content.readline()
            else:
                await asyncio.sleep(rng.uniform(0, 0.03))
            resp.close()  # drops the connection: the proxy sees the client leave mid-request
            return "disconnect"
        if resp.status != 200:
            await resp.read()
            return f"http_{resp.status}"
        if not body["stream"]:
            answer = await resp.json()
            return "ok" if answer.get("choices") else "bad_answer"
        events = 0
        done = False
        async for line in resp.content:
            if kind == "slow_reader" and events % 4 == 0:
                await asyncio.sleep(0.05)
            if line.startswith(b"data: "):
                events += 1
                if b'"error"' in line[:20]:
                    return "stream_error_event"
                done = done or line.startswith(b"data: [DONE]")
        return "ok" if done else "stream_truncated"


async def client_loop(http_factory: Callable[[], aiohttp.ClientSession], url: str, tally: Tally,
                      rng: random.Random, running: Callable[[], bool], counter: list[int]) -> None:
    http = http_factory()
    kinds, weights = zip(*KINDS, strict=True)
    try:
        while running():
            kind = rng.choices(kinds, weights)[0]
            counter[0] += 1
            start = time.monotonic()
            try:
                outcome = await asyncio.wait_for(one_request(http, url, kind, rng, counter[0]), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                outcome = "client_timeout"
            except aiohttp.ClientPayloadError:
                outcome = "payload_error"
            except aiohttp.ClientError as exc:
                outcome = f"client_error:{type(exc).__name__}"
            tally.record(kind, outcome, time.monotonic() - start)
    finally:
        await http.close()


async def proxy_gauges(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """pdproxy_requests_in_flight and the sum of pdproxy_upstream_in_flight, from /metrics."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    requests = upstream = 0.0
    for line in text.splitlines():
        if line.startswith("pdproxy_requests_in_flight "):
            requests = float(line.split()[-1])
        elif line.startswith("pdproxy_upstream_in_flight{"):
            upstream += float(line.split()[-1])
    return {"requests_in_flight": requests, "upstream_in_flight": upstream}


async def settle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Wait (bounded) until the proxy has nothing in flight; the gauges last read."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            gauges = await proxy_gauges(http, url)
            if (gauges["requests_in_flight"] == 0 and gauges["upstream_in_flight"] == 0) or \
                    time.monotonic() > deadline:
                return gauges
            await asyncio.sleep(0.2)


def measure(pid: int) -> dict[str, int]:
    fds = processes.open_fds([pid])
    return {"rss_kib": processes.rss_kib([pid]), "fds": fds[0][1] if fds else -1}


def fault_plan(prefill: list[Engine], decode: list[Engine], period: float, background: set[asyncio.Task[None]]
               ) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The faults, in turn, one per period; a killed engine is restarted half a period later (in `background`,
    so the next fault still comes on time)."""
    def later(engine: Engine) -> Callable[[], Awaitable[None]]:
        async def restart() -> None:
            await asyncio.sleep(period / 2)
            await engine.restart()

        async def kill_then_restart() -> None:
            await engine.kill()
            task = asyncio.ensure_future(restart())
            background.add(task)
            task.add_done_callback(background.discard)
        return kill_then_restart

    def now(action: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            action()
        return run

    return [
        ("kill P0", later(prefill[0])),
        ("P1 answers 500 x20", now(lambda: prefill[1].engine.fail_next(500, times=20))),
        ("D0 hangs x3", now(lambda: decode[0].engine.hang_next(times=3))),
        ("kill D1", later(decode[1])),
        ("D0 answers 500 x20", now(lambda: decode[0].engine.fail_next(500, times=20))),
        ("P0 hangs x3", now(lambda: prefill[0].engine.hang_next(times=3))),
        ("D1 dies mid-stream x5", now(lambda: decode[1].engine.die_after(3, times=5))),
        ("P1 drops x5", now(lambda: prefill[1].engine.drop_next(times=5))),
    ]


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    engines: list[Engine] = []
    for role, config in (("prefill", MockConfig(role="prefill", ttft_ms=5)),
                         ("prefill", MockConfig(role="prefill", ttft_ms=5)),
                         ("decode", MockConfig(role="decode", itl_ms=3, tokens=32)),
                         ("decode", MockConfig(role="decode", itl_ms=3, tokens=32))):
        engine, runner, url = await start_mock(config)
        engines.append(Engine(role, config, url, engine, runner))
    prefill = [e for e in engines if e.role == "prefill"]
    decode = [e for e in engines if e.role == "decode"]
    log = Path(args.out) / f"{args.name}-proxy.log"  # not kept in git (.gitignore)
    log.unlink(missing_ok=True)
    command = ["--prefill-servers", ",".join(e.url for e in prefill), "--decode-servers",
               ",".join(e.url for e in decode), "--host", "127.0.0.1", "--port", "0", *PROXY_ARGS]
    ((proxy, url),) = await asyncio.to_thread(processes.start_many, [(command, "pdproxy listening on")], log)
    tally = Tally()
    counter = [0]
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    phase_end = [0.0]

    def running() -> bool:
        return time.monotonic() < phase_end[0]

    def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def load(seconds: float) -> None:
        phase_end[0] = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(session, url, tally, random.Random(rng.random()), running, counter)
                               for _ in range(args.concurrency)))

    try:
        await load(args.warmup)  # warm the pools, caches and allocator before the baseline
        start_gauges = await settle(url)
        start = {**measure(proxy.pid), **start_gauges}
        restarts: set[asyncio.Task[None]] = set()
        plan = fault_plan(prefill, decode, args.fault_every, restarts)
        total = args.minutes * 60

        async def faults() -> None:
            index = 0
            while True:
                await asyncio.sleep(args.fault_every)
                for engine in engines:  # the previous fault's leftovers (unconsumed scripts) end with its period
                    engine.engine.clear_faults()
                name, action = plan[index % len(plan)]
                index += 1
                tally.fault = name
                samples.append({"t_s": round(time.monotonic() - t0), "fault": name, **measure(proxy.pid),
                                "requests": tally.requests, "failures": sum(tally.failures.values())})
                print(f"[{samples[-1]['t_s']:>4}s] {name}: {tally.requests} requests, "
                      f"{samples[-1]['failures']} failed, RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB, "
                      f"{samples[-1]['fds']} fds", flush=True)
                await action()

        injector = asyncio.ensure_future(faults())
        try:
            await load(total)
        finally:
            for task in [injector, *restarts]:
                task.cancel()
            for task in [injector, *restarts]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for engine in engines:
            engine.engine.clear_faults()
            await engine.restart()
        end_gauges = await settle(url)
        end = {**measure(proxy.pid), **end_gauges}
    finally:
        await asyncio.to_thread(processes.stop, proxy)
        for engine in engines:
            await engine.kill()
    log_text = log.read_text(errors="replace") if log.exists() else ""
    rss_flat = end["rss_kib"] <= start["rss_kib"] * RSS_SLACK[0] + RSS_SLACK[1]
    fds_flat = end["fds"] <= start["fds"] + FD_SLACK
    return {
        "meta": {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "command": " ".join(["python3", "benchmarks/soak.py", *sys.argv[1:]]),
                 "minutes": args.minutes, "warmup_s": args.warmup, "fault_every_s": args.fault_every,
                 "concurrency": args.concurrency, "seed": args.seed, "proxy_args": list(PROXY_ARGS),
                 "proxy_exit": proxy.returncode},
        "requests": tally.requests, "ok": tally.ok, "intended_disconnects": tally.disconnects,
        "failed": sum(tally.failures.values()), "failures": dict(tally.failures.most_common()),
        "failures_by_fault": dict(tally.failures_by_fault.most_common()), "kinds": dict(tally.kinds),
        "longest_request_s": round(tally.longest_s, 2),
        "start": start, "end": end, "samples": samples,
        "rss_flat": rss_flat, "fds_flat": fds_flat,
        "log_errors": sum(1 for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line),
    }


def markdown(result: dict[str, Any]) -> str:
    meta, start, end = result["meta"], result["start"], result["end"]
    lines = [f"Soak, {meta['when']}: `{meta['command']}` ({meta['minutes']:g} min after a {meta['warmup_s']:g} s "
             f"warm-up, {meta['concurrency']} clients, a fault every {meta['fault_every_s']:g} s)", "",
             "| | value |", "|---|---|",
             f"| requests | {result['requests']} |",
             f"| ok | {result['ok']} |",
             f"| intended client disconnects | {result['intended_disconnects']} |",
             f"| failed | {result['failed']} |"]
    for cause, count in result["failures"].items():
        lines.append(f"| failed: {cause} | {count} |")
    lines += [f"| longest request | {result['longest_request_s']} s |",
              f"| proxy RSS start → end (idle) | {start['rss_kib'] / 1024:.1f} → {end['rss_kib'] / 1024:.1f} MiB "
              f"({'flat' if result['rss_flat'] else 'GREW'}) |",
              f"| proxy open fds start → end (idle) | {start['fds']} → {end['fds']} "
              f"({'flat' if result['fds_flat'] else 'GREW'}) |",
              f"| in flight at the end (requests / upstream) | {end['requests_in_flight']:g} / "
              f"{end['upstream_in_flight']:g} |",
              f"| ERROR / traceback lines in the proxy log | {result['log_errors']} |", ""]
    if result["failures_by_fault"]:
        lines += ["| fault active | failure | count |", "|---|---|---|"]
        for key, count in result["failures_by_fault"].items():
            fault, _, cause = key.partition(": ")
            lines.append(f"| {fault} | {cause} | {count} |")
        lines.append("")
    if result["samples"]:
        lines += ["| t (s) | fault injected | requests so far | failed so far | RSS (MiB, under load) | fds |",
                  "|---|---|---|---|---|---|"]
        for s in result["samples"]:
            lines.append(f"| {s['t_s']} | {s['fault']} | {s['requests']} | {s['failures']} | "
                         f"{s['rss_kib'] / 1024:.1f} | {s['fds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the faulted load (default 10)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the baseline")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between two faults")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", default=str(HERE / "results"), help="where soak.json and soak.md go")
    parser.add_argument("--name", default="soak", help="file stem of the report")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    processes.raise_nofile_limit()
    try:
        result = asyncio.run(soak(args))
    finally:
        processes.stop_started()
    result["meta"]["left_running"] = processes.leftovers()
    out = Path(args.out)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0 if result["rss_flat"] and result["fds_flat"] and not result["meta"]["left_running"] else 1


if __name__ == "__main__":
    sys.exit(main())
