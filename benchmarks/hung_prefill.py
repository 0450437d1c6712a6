"""The hung-P scenario: one prefill server stops answering under paced load (issue 15, item 3).

    flock /tmp/pdproxy-heavy.lock python benchmarks/hung_prefill.py            # both runs, ~2.5 min
    python benchmarks/hung_prefill.py --rate 20 --seconds 8 --hang-at 3 --prefill-timeout 5 --quick  # a smoke run

Two mock P and one mock D (separate processes) behind `python -m pdproxy`; an open-loop client sends
streamed requests at --rate per second for --seconds. At --hang-at seconds P1 stops answering
(`POST /mock/hang`: it accepts requests and never answers them, while its /health still says healthy, as a
stuck engine's API server would), and stays so to the end. The run is made twice, without hedging
(`--prefill-hedge-budget 0`) and with the defaults, both with the same --prefill-timeout.

Reported per run: requests, failed, TTFT p50/p99/max, the normal TTFT (p50 of the requests that started
before the hang) and the max excess over it (the longest any client waited beyond normal), and the proxy's
hedge counters. JSON to --out/hung_prefill-POLICY.json, Markdown to --out/hung_prefill-POLICY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import processes
from progress import Progress
from report import summarize

HERE = Path(__file__).resolve().parent
DONE = b"data: [DONE]\n\n"
PROMPT_WORDS = 128


async def one(http: aiohttp.ClientSession, url: str, index: int, timeout: float) -> tuple[float, float | None, str]:
    """(start time, TTFT in seconds or None, 'ok' or what failed)."""
    started = time.perf_counter()
    body = {"model": "mock", "prompt": f"request {index} " + "word " * PROMPT_WORDS, "max_tokens": 8,
            "stream": True}
    ttft: float | None = None
    try:
        async with http.post(url + "/v1/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                await resp.read()
                return started, None, f"status {resp.status}"
            tail = b""
            async for chunk in resp.content.iter_any():
                if ttft is None:
                    ttft = time.perf_counter() - started
                tail = (tail + chunk)[-64:]
            if not tail.endswith(DONE) or b'"error"' in tail:
                return started, ttft, "broken stream"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return started, ttft, type(exc).__name__
    return started, ttft, "ok"


async def hedge_counters(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pdproxy_prefill_hedges_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counters[result] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("pdproxy_prefill_retries_total "):
            counters["prefill_retries"] = float(line.rsplit(" ", 1)[1])
    return {key: value for key, value in counters.items() if value}


async def paced_run(url: str, hung_p: str, args: argparse.Namespace, label: str) -> dict[str, Any]:
    total = int(args.rate * args.seconds)
    bar = Progress(total, label, enabled=not args.quiet)
    results: list[tuple[float, float | None, str]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        t0 = time.perf_counter()
        hang_at = t0 + args.hang_at
        hung = False
        tasks: list[asyncio.Task[tuple[float, float | None, str]]] = []
        for index in range(total):
            due = t0 + index / args.rate
            now = time.perf_counter()
            if not hung and now >= hang_at:
                async with http.post(hung_p + "/mock/hang") as resp:
                    assert resp.status == 200
                hung = True
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(one(http, url, index, args.client_timeout))
            task.add_done_callback(lambda _t: bar.update())
            tasks.append(task)
        results = list(await asyncio.gather(*tasks))
        bar.close()
        counters = await hedge_counters(http, url)
        async with http.delete(hung_p + "/mock/hang") as resp:
            assert resp.status == 200
    before = [ttft for started, ttft, outcome in results if started < hang_at and outcome == "ok" and ttft]
    ttfts = [ttft for _s, ttft, outcome in results if outcome == "ok" and ttft is not None]
    failures: dict[str, int] = {}
    for _s, _t, outcome in results:
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    normal = summarize(before)["p50"]
    stats = summarize(ttfts)
    worst = stats["max"]
    return {
        "run": label, "requests": len(results), "failed": sum(failures.values()), "failures": failures,
        "ttft_ms": stats, "normal_ttft_ms": normal,
        "max_excess_ms": None if worst is None or normal is None else round(worst - normal, 1),
        "over_2s": sum(1 for t in ttfts if normal is not None and t * 1000 - normal > 2000),
        "hedges": counters,
    }


async def scenario(args: argparse.Namespace, hedging: bool, logs: Path) -> dict[str, Any]:
    label = "with hedging" if hedging else "without hedging"
    mock = ("--ttft-ms", str(args.prefill_ms))
    started = processes.start_many([
        (("mock", "--role", "prefill", "--port", "0", *mock), "listening on"),
        (("mock", "--role", "prefill", "--port", "0", *mock), "listening on"),
        (("mock", "--role", "decode", "--port", "0", "--itl-ms", "2"), "listening on"),
    ], log=logs / "engines.log")
    (_p0, p0), (_p1, p1), (_d, d) = started
    proxy_args = ["--prefill-servers", f"{p0},{p1}", "--decode-servers", d, "--host", "127.0.0.1", "--port", "0",
                  "--no-access-log", "--prefill-timeout", str(args.prefill_timeout),
                  "--prefill-deadline", str(args.prefill_timeout * 3), "--prefill-policy", args.policy]
    if not hedging:
        proxy_args += ["--prefill-hedge-budget", "0"]
    owned = [process for process, _url in started]
    try:
        ((proxy, url),) = processes.start_many([(proxy_args, "pdproxy listening on")], log=logs / "proxy.log")
        owned.append(proxy)
        result = await paced_run(url, p1, args, label)
    finally:
        processes.stop_all(owned)
    result["proxy_args"] = " ".join(proxy_args[6:])
    return result


def markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Hung P: 2 mock P (`--ttft-ms {args.prefill_ms}`), 1 mock D, {args.rate:g} streamed requests/s for "
        f"{args.seconds:g} s; P1 stops answering at {args.hang_at:g} s (its /health still healthy) and stays hung; "
        f"`--prefill-timeout {args.prefill_timeout:g} --prefill-policy {args.policy}`.",
        "",
        "| run | requests | failed | TTFT p50 ms | TTFT p99 ms | TTFT max ms | normal TTFT ms | max excess ms "
        "| > 2 s over normal | hedges | prefill retries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in runs:
        t = run["ttft_ms"]
        hedges = ", ".join(f"{k} {int(v)}" for k, v in sorted(run["hedges"].items()) if k != "prefill_retries")
        lines.append(f"| {run['run']} | {run['requests']} | {run['failed']} | {t['p50']} | {t['p99']} | {t['max']} | "
                     f"{run['normal_ttft_ms']} | {run['max_excess_ms']} | {run['over_2s']} | {hedges or '-'} | "
                     f"{int(run['hedges'].get('prefill_retries', 0))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50, help="requests per second (default 50)")
    parser.add_argument("--seconds", type=float, default=40, help="seconds of load (default 40)")
    parser.add_argument("--hang-at", type=float, default=10, help="seconds into the load when P1 hangs (default 10)")
    parser.add_argument("--prefill-ms", type=int, default=20, help="the mocks' prefill time (default 20 ms)")
    parser.add_argument("--prefill-timeout", type=float, default=30,
                        help="the proxy's --prefill-timeout in both runs (default 30 s)")
    parser.add_argument("--client-timeout", type=float, default=120, help="a client gives up after this")
    parser.add_argument("--runs", default="without,with", help="without,with (default both)")
    parser.add_argument("--policy", default="round_robin",
                        help="--prefill-policy (default round_robin, as benchmarks/harness.py: half the requests "
                             "meet the hung P; least_conn, pdproxy's default, steers most away by itself)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for hung_prefill.json/.md")
    parser.add_argument("--quick", action="store_true", help="write nothing, print the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    processes.raise_nofile_limit()
    logs = Path(f"/tmp/pdproxy-hung-prefill-{int(time.time())}")
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in args.runs.split(","):
        runs.append(asyncio.run(scenario(args, name.strip() == "with", logs)))
        print(json.dumps(runs[-1]), flush=True)
    table = markdown(runs, args)
    print(table)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"hung_prefill-{args.policy}"
        (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
        (out / f"{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
