"""A small, bounded load generator for an OpenAI-compatible endpoint (streaming or not).

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --requests 2000 --concurrency 64
    python benchmarks/loadgen.py --direct-pd P1,P2 --decode D --requests 2000   # no proxy: the floor

Sends exactly --requests requests (never more, and stops at --max-seconds), counts errors,
and prints one JSON line: requests, errors, throughput, TTFT and end-to-end percentiles.
With --direct-pd the generator itself does what a PD proxy does (prefill on P, round robin,
then decode on D with the handle), which is the floor any PD proxy is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    body = {"model": "mock", "prompt": " ".join(["word"] * args.prompt_words), "max_tokens": args.max_tokens,
            "stream": not args.no_stream}
    ttfts: list[float] = []
    latencies: list[float] = []
    errors: dict[str, int] = {}
    remaining = args.requests
    deadline = time.perf_counter() + args.max_seconds
    done = 0

    prefill_urls = args.direct_pd.split(",") if args.direct_pd else []
    prefill_body = {**body, "stream": False, "max_tokens": 1,
                    "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    target = (args.decode if prefill_urls else args.url) + "/v1/completions"
    sent = 0

    async def decode_body(http: aiohttp.ClientSession) -> dict[str, object]:
        """Direct PD: run the prefill here and return the decode body (the client body + handle)."""
        nonlocal sent
        sent += 1
        async with http.post(prefill_urls[sent % len(prefill_urls)] + "/v1/completions", json=prefill_body) as p:
            answer = await p.json()
        return {**body, "kv_transfer_params": answer["kv_transfer_params"]}

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal remaining, done
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            start = time.perf_counter()
            try:
                payload_body = await decode_body(http) if prefill_urls else body
                async with http.post(target, json=payload_body) as resp:
                    first = await resp.content.readany()
                    ttft = time.perf_counter() - start
                    rest = await resp.read()
                    payload = first + rest
                    if resp.status != 200 or (body["stream"] and not payload.endswith(b"data: [DONE]\n\n")):
                        key = f"status {resp.status}" if resp.status != 200 else "incomplete stream"
                        errors[key] = errors.get(key, 0) + 1
                    else:
                        ttfts.append(ttft)
                        latencies.append(time.perf_counter() - start)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            done += 1
            if args.progress and done % max(1, args.requests // 20) == 0:
                print(f"\r{done}/{args.requests}", end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    if args.progress:
        print(file=sys.stderr)
    return {
        "requests": done,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(elapsed, 3),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "ttft_p50_ms": _ms(percentile(ttfts, 0.5)),
        "ttft_p99_ms": _ms(percentile(ttfts, 0.99)),
        "e2e_p50_ms": _ms(percentile(latencies, 0.5)),
        "e2e_p99_ms": _ms(percentile(latencies, 0.99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=120)
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--direct-pd", metavar="P_URLS", help="comma list of prefill URLs: no proxy in between")
    parser.add_argument("--decode", metavar="D_URL", help="decode URL, with --direct-pd")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if bool(args.direct_pd) != bool(args.decode):
        parser.error("--direct-pd and --decode go together")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
