"""Routing benchmark: how well each prefill policy finds the prefix cache, through the real proxy.

    python benchmarks/routing.py                    # both workloads, every policy, ~1 min on 2 cores
    python benchmarks/routing.py --workload chat --policies cache_aware,oracle

One process, one event loop: mock prefill engines that model a bounded LRU prefix cache (block
level) and compute one prompt at a time for `--ms-per-token` per uncached token, a mock decode
engine, the real pdproxy in front of them, and a closed-loop client, all over HTTP on loopback.
For each policy a fresh proxy and fresh (cold) engines serve the same request sequence.

Workloads:
  groups  single-turn prompts in groups; each group shares a long prefix (a document), each
          request adds its own question;
  chat    multi-turn conversations that all start with the same long system prompt; each turn
          resends the whole history (previous turns and assistant replies).

Each engine's cache holds `--cache-factor` × its fair share of the working set, so one server
cannot hold everything but all together can. Policies: the proxy's round_robin, least_conn,
least_tokens, prefix_hash, cache_aware, and `oracle`, which pins each group or conversation to
one server because it knows the group id (sent as the OpenAI `user` field, which only it reads).

Sharing (issue 14): `--workers 1,2,4` also runs cache_aware in a real `pdproxy --workers N` process
per count (the kernel spreads the client's connections over the workers), and `--replicas 2`
runs two separate pdproxy processes with the client alternating between them, as a round-robin
L4 balancer would (each replica on its own approximate index).

Reported per workload and policy: prefix-cache hit ratio (hit prompt tokens / prompt tokens, from
the engines' /stats), per-server request counts and max/mean imbalance, TTFT p50/p99, throughput.
Results go to benchmarks/results/routing.{json,md,png}; matplotlib is installed for the chart
if it is missing (it is not a pdproxy dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing
from pdproxy.app import build_app, start_server
from pdproxy.mock import BLOCK_SIZE, MockConfig, MockEngine, start_mock
from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.request import ProxyRequest
from pdproxy.settings import Settings
from pdproxy.upstreams import Role, Upstream

RESULTS = Path(__file__).resolve().parent / "results"
SRC = str(Path(__file__).resolve().parents[1] / "src")
PROXY_POLICIES = ("round_robin", "least_conn", "least_tokens", "prefix_hash", "cache_aware")
ALL_POLICIES = (*PROXY_POLICIES, "oracle")
JSON_HEADERS = {"Content-Type": "application/json"}


# ------------------------------------------------------------------------------------ workloads


@dataclass(slots=True)
class Job:
    """One request of the workload: its body, and the conversation it continues (chat) if any."""

    body: dict[str, Any]
    group: int


@dataclass(slots=True)
class Workload:
    """A fixed request plan: `streams` are run one after the other by the closed-loop workers."""

    name: str
    streams: list[list[Job]]  # each stream's jobs are sequential (a conversation's turns); streams interleave
    working_set_words: int  # words the engines must cache to serve every hit
    chars_per_word: float
    description: str
    requests: int = field(init=False)

    def __post_init__(self) -> None:
        self.requests = sum(len(s) for s in self.streams)


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def _text(rng: random.Random, vocab: Sequence[str], words: int) -> str:
    return " ".join(rng.choices(vocab, k=words))


def groups_workload(args: argparse.Namespace) -> Workload:
    """Single-turn prompts: `groups` long shared prefixes, each request with its own question."""
    rng = random.Random(args.seed)
    vocab = _vocabulary(rng)
    prefixes = [_text(rng, vocab, args.prefix_words) for _ in range(args.groups)]
    per_group = args.requests // args.groups
    order = [g for g in range(args.groups) for _ in range(per_group)]
    rng.shuffle(order)
    jobs = []
    for i, group in enumerate(order):
        prompt = f"{prefixes[group]} question {i}: {_text(rng, vocab, args.question_words)}"
        jobs.append(Job({"model": "mock", "prompt": prompt, "max_tokens": 2, "stream": True,
                         "user": str(group)}, group))
    text = " ".join(prefixes)
    return Workload(
        "groups", [[job] for job in jobs], args.groups * args.prefix_words, len(text) / len(text.split()),
        f"{args.groups} groups x {per_group} requests, {args.prefix_words}-word shared prefix + "
        f"{args.question_words}-word question",
    )


def chat_workload(args: argparse.Namespace) -> Workload:
    """Multi-turn chats: one shared system prompt; every turn resends the whole history."""
    rng = random.Random(args.seed + 1)
    vocab = _vocabulary(rng)
    system = {"role": "system", "content": _text(rng, vocab, args.system_words)}
    streams = []
    for conversation in range(args.conversations):
        messages: list[dict[str, str]] = [system]
        turns = []
        for turn in range(args.turns):
            messages = [*messages, {"role": "user", "content": f"turn {turn}: {_text(rng, vocab, args.user_words)}"}]
            turns.append(Job({"model": "mock", "messages": messages, "max_tokens": 2, "stream": True,
                              "user": str(conversation)}, conversation))
            messages = [*messages, {"role": "assistant", "content": _text(rng, vocab, args.assistant_words)}]
        streams.append(turns)
    live_history = args.concurrency * (args.turns + 1) / 2 * (args.user_words + args.assistant_words)
    text = system["content"]
    return Workload(
        "chat", streams, int(args.system_words + live_history), len(text) / len(text.split()),
        f"{args.conversations} conversations x {args.turns} turns, {args.system_words}-word shared system "
        f"prompt, {args.user_words}-word user turns, {args.assistant_words}-word replies",
    )


def _path(job: Job) -> str:
    return "/v1/chat/completions" if "messages" in job.body else "/v1/completions"


# ------------------------------------------------------------------------------------ the oracle


class PinByGroup:
    """The oracle: it knows each request's group (the `user` field) and pins group g to server g mod n."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = list(urls)

    def choose(self, candidates: Sequence[Upstream], request: ProxyRequest) -> Upstream:  # type: ignore[override]
        home = self._urls[int(request.body["user"]) % len(self._urls)]
        for upstream in candidates:
            if upstream.url == home:
                return upstream
        return min(candidates, key=lambda u: u.in_flight)  # never happens without caps


# ------------------------------------------------------------------------------------ one run


class Progress:
    """One status line on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self._shown = label, total, 0, 0.0
        self._start = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        redraw = sys.stderr.isatty() and now - self._shown >= 0.1
        if redraw or self.done == self.total:
            self._shown = now
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r  {self.label:<28} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total} {now - self._start:5.1f}s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def _client(urls: Sequence[str], workload: Workload, concurrency: int,
                  progress: Progress) -> tuple[list[float], int]:
    """Closed loop: `concurrency` workers, each running whole streams (conversations) in turn.

    With several proxy urls (replicas) the requests alternate between them, one by one."""
    ttfts: list[float] = []
    errors = 0
    streams = iter(workload.streams)
    timeout = aiohttp.ClientTimeout(total=60)
    sent = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal errors, sent
        for stream in streams:
            for job in stream:
                body = orjson.dumps(job.body)
                url = urls[sent % len(urls)]
                sent += 1
                start = time.perf_counter()
                try:
                    async with http.post(url + _path(job), data=body, headers=JSON_HEADERS,
                                         timeout=timeout) as resp:
                        first = await resp.content.readany()
                        ttft = time.perf_counter() - start
                        await resp.read()
                        if resp.status == 200 and first:
                            ttfts.append(ttft)
                        else:
                            errors += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                progress.step()

    # A new connection per request when the proxy has workers: SO_REUSEPORT spreads connections,
    # so kept-alive ones would pin each client to one worker.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return ttfts, errors


@dataclass(slots=True)
class Result:
    workload: str
    policy: str
    requests: int
    errors: int
    seconds: float
    throughput: float
    hit_ratio: float
    hit_tokens: int
    prompt_tokens: int
    per_server: list[int]
    max_over_mean: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    load_average: float  # of the machine over the last minute, at the end: other work skews the timings


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProxyProcess:
    """A real `pdproxy` process (`--workers N`), its output drained so it never blocks on a pipe."""

    LISTENING = re.compile(r"pdproxy listening on (http://127\.0\.0\.1:\d+)")

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, args: Sequence[str]) -> ProxyProcess:
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pdproxy", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        proxy = cls(process)
        try:
            await asyncio.wait_for(asyncio.shield(proxy.url), 60)
        except BaseException:
            await proxy.stop()
            raise
        return proxy

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            match = self.LISTENING.search(text)
            if match and not self.url.done():
                self.url.set_result(match[1])
        if not self.url.done():
            self.url.set_exception(RuntimeError("pdproxy exited: " + " | ".join(self.lines[-5:])))

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._reader


def _variant(policy: str) -> tuple[str, int, int, bool]:
    """`cache_aware@w4` -> (cache_aware, 4 workers, 0 replicas, no events); `cache_aware@r2` -> 2 replicas;
    `cache_aware@r2e` -> 2 replicas routing on the mock engines' KV events."""
    name, _, where = policy.partition("@")
    if not where:
        return name, 0, 0, False
    events = where.endswith("e")
    count = int(where[1:].rstrip("e"))
    return (name, count, 0, events) if where[0] == "w" else (name, 1, count, events)


def label(policy: str) -> str:
    name, workers, replicas, events = _variant(policy)
    if replicas:
        return f"{name}, {replicas} replicas" + (" + KV events" if events else "")
    return f"{name}, --workers {workers}" if workers else name


async def run_policy(workload: Workload, policy: str, args: argparse.Namespace) -> Result:
    """Fresh engines and a fresh proxy, the whole workload, then the engines' counters."""
    policy, workers, replicas, events = _variant(policy)
    words_per_server = args.cache_factor * workload.working_set_words / args.prefill
    cache_blocks = math.ceil(words_per_server / BLOCK_SIZE)
    index_blocks = math.ceil(words_per_server * workload.chars_per_word / args.cache_block_chars)
    runners = []
    processes: list[ProxyProcess] = []
    engines: list[MockEngine] = []
    urls: list[str] = []
    try:
        for _ in range(args.prefill):
            engine, runner, url = await start_mock(MockConfig(
                role="prefill", cache_blocks=cache_blocks, prefill_ms_per_token=args.ms_per_token, kv_events=events))
            runners.append(runner)
            engines.append(engine)
            urls.append(url)
        _, runner, decode_url = await start_mock(MockConfig(role="decode"))
        runners.append(runner)
        if workers:
            proxy_urls = []
            for _ in range(max(replicas, 1)):
                proxy = await ProxyProcess.start([
                    "--prefill-servers", ",".join(urls), "--decode-servers", decode_url, "--host", "127.0.0.1",
                    "--port", "0", "--workers", str(workers), "--metrics-port", str(_free_port()),
                    "--health-interval", "0", "--no-access-log", "--prefill-policy", policy,
                    "--cache-block-chars", str(args.cache_block_chars),
                    "--cache-index-max-blocks", str(index_blocks),
                    "--cache-aware-weight", str(args.cache_aware_weight),
                    "--cache-aware-load", args.cache_aware_load,
                    *(["--kv-events", "--tokenizer", "words"] if events else [])])
                processes.append(proxy)
                proxy_urls.append(proxy.url.result())
                if events:
                    await _wait_exact(proxy_urls[-1])
            name = label(f"{policy}@{'r' if replicas else 'w'}{replicas or workers}{'e' if events else ''}")
            progress = Progress(f"{workload.name} / {name}", workload.requests)
            started = time.perf_counter()
            ttfts, errors = await _client(proxy_urls, workload, args.concurrency, progress)
            seconds = time.perf_counter() - started
            stats = await _engine_stats(urls)
            return _result(workload, name, stats, ttfts, errors, seconds)
        settings = Settings(
            prefill_servers=",".join(urls), decode_servers=decode_url, access_log=False, health_interval=0,
            prefill_policy="least_conn" if policy == "oracle" else policy,
            cache_block_chars=args.cache_block_chars, cache_index_max_blocks=index_blocks,
            cache_aware_weight=args.cache_aware_weight, cache_aware_load=args.cache_aware_load,
        )
        app = build_app(settings, rng=random.Random(args.seed))
        if policy == "oracle":
            app.flow.prefill.policy = PinByGroup(urls)
        proxy_runner, proxy_url = await start_server(app, "127.0.0.1", 0)
        runners.append(proxy_runner)
        progress = Progress(f"{workload.name} / {policy}", workload.requests)
        started = time.perf_counter()
        ttfts, errors = await _client([proxy_url], workload, args.concurrency, progress)
        seconds = time.perf_counter() - started
        stats = await _engine_stats(urls)
    finally:
        for proxy in processes:
            await proxy.stop()
        for runner in reversed(runners):
            await runner.cleanup()
    return _result(workload, policy, stats, ttfts, errors, seconds)


async def _wait_exact(proxy_url: str, timeout: float = 20.0) -> None:
    """Until the proxy's view of every prefill server's KV events is exact (its subscriptions caught up)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(proxy_url + "/health?verbose=1") as resp:
                upstreams = (await resp.json())["upstreams"]
            states = [u.get("kv_events", {}).get("state") for u in upstreams if u["role"] == "prefill"]
            if states and all(state == "exact" for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"KV-event views not exact after {timeout:g}s: {states}")
            await asyncio.sleep(0.1)


async def _engine_stats(urls: Sequence[str]) -> list[dict[str, Any]]:
    stats = []
    async with aiohttp.ClientSession() as http:
        for url in urls:
            async with http.get(url + "/stats") as resp:
                stats.append(await resp.json())
    return stats


def _result(workload: Workload, policy: str, stats: list[dict[str, Any]], ttfts: list[float], errors: int,
            seconds: float) -> Result:
    hit = sum(s["prompt_tokens_hit"] for s in stats)
    total = hit + sum(s["prompt_tokens_miss"] for s in stats)
    counts = [s["prefills"] for s in stats]
    mean = sum(counts) / len(counts)
    return Result(
        workload.name, policy, workload.requests, errors, round(seconds, 2), round(workload.requests / seconds, 1),
        round(hit / total, 4) if total else 0.0, hit, total, counts, round(max(counts) / mean, 3) if mean else 0.0,
        round(_percentile(ttfts, 0.5) * 1000, 2), round(_percentile(ttfts, 0.99) * 1000, 2),
        round(os.getloadavg()[0], 2),
    )


def decision_cost(servers: int = 8, prompt_chars: int = 4096, decisions: int = 4000) -> dict[str, float]:
    """µs per routing decision of each proxy policy (best of 5 rounds), on warm state.

    Prompts share 32 long prefixes (so cache_aware's index holds and matches blocks), 4k
    characters each, completions and chat alike; nothing is leased, so loads stay at zero.
    """
    rng = random.Random(7)
    vocab = _vocabulary(rng)
    prefixes = [_text(rng, vocab, 700)[: prompt_chars - 200] for _ in range(32)]
    requests = []
    for i in range(decisions):
        body: dict[str, Any]
        if i % 2:
            body = {"prompt": prefixes[i % 32] + " " + _text(rng, vocab, 40)[:199]}
        else:
            body = {"messages": [{"role": "system", "content": prefixes[i % 32]},
                                 {"role": "user", "content": _text(rng, vocab, 40)[:180]}]}
        requests.append(ProxyRequest("/v1/chat/completions" if "messages" in body else "/v1/completions",
                                     body, False, str(i), {}))
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    options = PolicyOptions(
        prefix_chars=defaults["prefix_hash_chars"], vnodes=defaults["prefix_hash_vnodes"],
        load_factor=defaults["prefix_hash_load_factor"], block_chars=defaults["cache_block_chars"],
        index_max_blocks=defaults["cache_index_max_blocks"], cache_weight=defaults["cache_aware_weight"],
        cache_load=defaults["cache_aware_load"], chars_per_token=defaults["chars_per_token"])
    costs = {}
    for name in PROXY_POLICIES:
        pool = [Upstream(Role.PREFILL, f"http://10.0.0.{i + 1}:8100") for i in range(servers)]
        policy = make_balancer(name, options, rng=random.Random(1))
        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            for request in requests:
                policy.choose(pool, request)
            best = min(best, (time.perf_counter() - started) / len(requests))
        costs[name] = round(best * 1e6, 2)
    for name in ("least_conn", "cache_aware"):
        costs[f"{name} shared, 4 workers"] = _shared_decision_cost(options, requests, servers, name)
    return costs


def _shared_decision_cost(options: PolicyOptions, requests: Sequence[ProxyRequest], servers: int,
                          name: str) -> float:
    """µs per decision of policy `name` in worker 0 of 4 sharing a table, each of the 3 others deciding as often.

    Every candidate's load is summed over the 4 rows. For cache_aware the others' decisions are
    published between ours (their feed entries are what ours replays); the time of publishing
    them alone is measured apart and taken off."""
    from pdproxy.policies.prefix_index import block_keys
    from pdproxy.routing.feed import DecisionFeed
    from pdproxy.routing.load import WorkerRow
    from pdproxy.routing.share import SharedBalancer
    from pdproxy.routing.table import SharedTable, server_key

    table = SharedTable.create(4)
    try:
        row = WorkerRow(table, 0)
        policy = SharedBalancer(make_balancer(name, options, rng=random.Random(1)), row, DecisionFeed(table, 0))
        pool = [Upstream(Role.PREFILL, f"http://10.0.0.{i + 1}:8100") for i in range(servers)]
        others = [DecisionFeed(table, w) for w in (1, 2, 3)]
        keys = [block_keys(r.prompt_prefix(options.block_chars * options.index_max_blocks), options.block_chars)
                for r in requests]
        targets = [server_key("prefill", u.url) for u in pool]

        def publish(i: int) -> None:
            if name != "cache_aware":
                return
            for w, feed in enumerate(others):
                feed.publish(targets[(i + w) % len(targets)], keys[(i + 7 * w) % len(keys)])

        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            for i, request in enumerate(requests):
                publish(i)
                policy.choose(pool, request)
            both = time.perf_counter() - started
            started = time.perf_counter()
            for i in range(len(requests)):
                publish(i)
            best = min(best, (both - (time.perf_counter() - started)) / len(requests))
        del policy, pool
        return round(best * 1e6, 2)
    finally:
        table.close()
        table.unlink()


# ------------------------------------------------------------------------------------ reporting


def markdown(results: Sequence[Result], workloads: dict[str, Workload], args: argparse.Namespace,
             costs: dict[str, float]) -> str:
    lines = [
        "# Routing benchmark",
        "",
        f"{args.prefill} mock prefill engines (prefix cache: {args.cache_factor} x each one's share of the working "
        f"set, {args.ms_per_token} ms per uncached token, one prompt at a time), 1 mock decode engine, "
        f"{args.concurrency} closed-loop clients, through pdproxy on loopback. cache_aware: "
        f"load={args.cache_aware_load}, w={args.cache_aware_weight}, {args.cache_block_chars}-char blocks.",
        "",
    ]
    if costs:
        lines += ["Decision cost, µs per decision (8 servers, 4k-character prompts, best of 5): "
                  + ", ".join(f"{name} {us:.1f}" for name, us in costs.items()) + ".", ""]
    for name, workload in workloads.items():
        rows = [r for r in results if r.workload == name]
        oracle = next((r for r in rows if r.policy == "oracle"), None)
        lines += [f"## {name}: {workload.description}", "",
                  "| policy | hit ratio | vs oracle | requests per server | max/mean | TTFT p50 ms | TTFT p99 ms "
                  "| req/s | errors | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            versus = f"{r.hit_ratio / oracle.hit_ratio:.3f}" if oracle and oracle.hit_ratio else "-"
            lines.append(f"| {r.policy} | {r.hit_ratio:.3f} | {versus} | {' / '.join(map(str, r.per_server))} | "
                         f"{r.max_over_mean:.3f} | {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.throughput:.0f} | "
                         f"{r.errors} | {r.load_average:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _matplotlib() -> Any:
    """Import matplotlib, installing it into this interpreter first if it is missing (chart only)."""
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        sys.stderr.write("matplotlib is missing: installing it for the chart (pip install matplotlib)\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)
        return importlib.import_module("matplotlib")


def chart(results: Sequence[Result], path: Path) -> None:
    matplotlib = _matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in results))
    policies = list(dict.fromkeys(r.policy for r in results))
    panels = (("hit_ratio", "prefix-cache hit ratio"), ("max_over_mean", "requests per server, max/mean"),
              ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    width = 0.8 / len(names)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            values = [next((getattr(r, key) for r in results if r.workload == name and r.policy == p), 0)
                      for p in policies]
            ax.bar([x + i * width for x in range(len(policies))], values, width, label=name)
        if key == "max_over_mean":
            ax.axhline(1.1, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(policies))])
        ax.set_xticklabels(policies, rotation=35, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("groups", "chat", "both"), default="both")
    parser.add_argument("--policies", default=",".join(ALL_POLICIES), help="comma list (default: all)")
    parser.add_argument("--prefill", type=int, default=4, help="mock prefill engines")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (live conversations)")
    parser.add_argument("--ms-per-token", type=float, default=0.05, help="engine compute per uncached token")
    parser.add_argument("--cache-factor", type=float, default=1.5,
                        help="each engine's cache, as a multiple of its fair share of the working set")
    parser.add_argument("--cache-block-chars", type=int, default=128)
    parser.add_argument("--cache-aware-weight", type=float, default=Settings.model_fields["cache_aware_weight"].default)
    parser.add_argument("--cache-aware-load", default=Settings.model_fields["cache_aware_load"].default)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--requests", type=int, default=800, help="groups workload: requests in all")
    parser.add_argument("--prefix-words", type=int, default=1000)
    parser.add_argument("--question-words", type=int, default=150)
    parser.add_argument("--conversations", type=int, default=128)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-words", type=int, default=400)
    parser.add_argument("--user-words", type=int, default=100)
    parser.add_argument("--assistant-words", type=int, default=100)
    parser.add_argument("--workers", default="",
                        help="comma list of worker counts: cache_aware in a real `pdproxy --workers N` per count")
    parser.add_argument("--replicas", type=int, default=0,
                        help="also run cache_aware in this many pdproxy replicas, the client alternating between them, "
                             "without and with the mock engines' KV events")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--no-chart", action="store_true")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> list[Result]:
    names = ("groups", "chat") if args.workload == "both" else (args.workload,)
    builders = {"groups": groups_workload, "chat": chat_workload}
    workloads = {name: builders[name](args) for name in names}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(policies) - set(ALL_POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
    policies += [f"cache_aware@w{int(n)}" for n in args.workers.split(",") if n.strip()]
    if args.replicas:
        policies.append(f"cache_aware@r{args.replicas}")
        policies.append(f"cache_aware@r{args.replicas}e")
    costs = decision_cost()
    results = []
    for workload in workloads.values():
        for policy in policies:
            results.append(await run_policy(workload, policy, args))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "routing",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workloads": {name: {"description": w.description, "requests": w.requests,
                             "working_set_words": w.working_set_words} for name, w in workloads.items()},
        "decision_cost_us": costs,
        "results": [asdict(r) for r in results],
    }
    (args.out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(results, workloads, args, costs)
    (args.out / "routing.md").write_text(text + "\n")
    print(text)
    if not args.no_chart:
        chart(results, args.out / "routing.png")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
