"""pdproxy benchmark harness: every system, every workload, one run, one command.

    python benchmarks/harness.py                      # the full run (a few minutes)
    python benchmarks/harness.py --quick              # small sizes, to check it works (about a minute)
    python benchmarks/harness.py --systems direct-pd,pdproxy --workloads S1,S3

Starts mock engines (`pdproxy mock`: 2 prefill + 1 decode, or 4 decode for S4), then each system
under test in turn (direct-pd, pdproxy, nginx, vllm-router, sglang-router; every one on 127.0.0.1
only), drives it with benchmarks/loadgen.py, reads the proxy's CPU time and memory from /proc,
stops everything it started by PID, and writes NAME.json, NAME.md and NAME.png (throughput and
TTFT p99 per system) under benchmarks/results/. vllm-router and sglang-router are installed into
their own venvs under benchmarks/.venvs/, nginx with apt-get; a system that cannot be installed or
started is reported as skipped, with the reason. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import processes  # noqa: E402
import report  # noqa: E402
import systems  # noqa: E402
from progress import Progress  # noqa: E402
from report import summarize  # noqa: E402

LOADGEN = HERE / "loadgen.py"
SYSTEM_ORDER = ("direct-pd", "pdproxy", "pdproxy-unshared", "floor", "nginx", "vllm-router", "sglang-router")
DEFAULT_SYSTEMS = tuple(s for s in SYSTEM_ORDER if s != "pdproxy-unshared")  # that one only with --pdproxy-workers
STREAMS_PER_ENGINE = 4096  # S4: streams per decode engine and per load generator process
# S4: streams being opened at once per load generator. Bursts of new connections beyond a listener's
# backlog (aiohttp's default is 128, the mock engines' too) are dropped by the kernel and retried
# after 1, 3, 7, 15 s: a test of backlogs, not of proxies.
MAX_OPENING = 64


@dataclass(frozen=True)
class Workload:
    """One workload. Closed loop (S1-S3): `requests` from `concurrency` clients. Scale (S4): `steps`."""

    name: str
    title: str
    stream: bool = True
    concurrency: int = 64
    requests: int = 2000
    max_tokens: int = 64
    prompt_words: int = 128
    itl_ms: float = 0.0  # decode engines: delay between tokens
    prefill_ms_per_token: float = 0.0  # prefill engines: compute per uncached prompt token
    warmup: int = 200
    max_seconds: float = 60.0
    steps: tuple[int, ...] = ()  # S4: open streams to reach, one step after the other
    hold_seconds: float = 0.0  # S4: how long each step is held before it is measured
    open_rate: float = 2000.0  # S4: new streams per second, all load generators together
    decode_engines: int = 1
    loadgen_processes: int = 1
    proxy_processes: int = 1  # processes a proxy needs for its fds (S4); used where a system can have them

    @property
    def scale(self) -> bool:
        return bool(self.steps)


def make_workloads(quick: bool, fd_limit: int) -> dict[str, Workload]:
    steps = (256, 1024) if quick else (1024, 4096, 16384)
    top = max(steps)
    per_process = int(fd_limit * 0.9)  # fds one process can give to sockets, with some left for the rest
    # A proxied stream holds two sockets (client side and upstream side); a PD proxy briefly a third.
    proxy_processes = max(1, math.ceil(2 * top / per_process))
    engines = max(1, math.ceil(top / STREAMS_PER_ENGINE))
    n = 400 if quick else 2000
    return {
        "S1": Workload("S1", "streaming, concurrency 64, 64 tokens, no inter-token delay (proxy-bound)",
                       concurrency=64, requests=n, max_tokens=64, warmup=100 if quick else 200),
        "S2": Workload("S2", "streaming, concurrency 256, 128 tokens, 20 ms between tokens (many open streams)",
                       concurrency=256, requests=512 if quick else 2000, max_tokens=128, itl_ms=20.0,
                       prefill_ms_per_token=0.01, warmup=256),
        "S3": Workload("S3", "non-streaming, concurrency 32, 64 tokens, no delay", stream=False, concurrency=32,
                       requests=n, max_tokens=64, warmup=100 if quick else 200),
        "L1": Workload("L1", "latency: streaming, concurrency 64, 16 tokens, 50 ms between tokens (not saturated)",
                       concurrency=64, requests=192 if quick else 800, max_tokens=16, itl_ms=50.0, warmup=64),
        "S4": Workload("S4", "scale: open streams stepped " + " -> ".join(str(s) for s in steps)
                       + ", 1 token every 2 s", steps=steps, itl_ms=2000.0, hold_seconds=2.0 if quick else 5.0,
                       max_seconds=170.0, decode_engines=engines, loadgen_processes=engines,
                       proxy_processes=proxy_processes, warmup=0, requests=0, concurrency=0,
                       max_tokens=100),
    }


def tiny_workloads() -> dict[str, Workload]:
    """A few requests each: the functional test's smoke run."""
    return {
        "S1": Workload("S1", "smoke: streaming", concurrency=4, requests=12, max_tokens=8, warmup=4, max_seconds=10),
        "S2": Workload("S2", "smoke: streaming with delays", concurrency=8, requests=8, max_tokens=4, itl_ms=5,
                       warmup=0, max_seconds=10),
        "S3": Workload("S3", "smoke: non-streaming", stream=False, concurrency=4, requests=12, max_tokens=8,
                       warmup=4, max_seconds=10),
        "L1": Workload("L1", "smoke: latency", concurrency=4, requests=8, max_tokens=4, itl_ms=5, warmup=0,
                       max_seconds=10),
        "S4": Workload("S4", "smoke: open streams 4 -> 8", steps=(4, 8), itl_ms=200, hold_seconds=0.25,
                       max_seconds=20, decode_engines=1, loadgen_processes=2, warmup=0, requests=0,
                       concurrency=0, max_tokens=100),
    }


# ------------------------------------------------------------------------------------------------ engines


def start_engines(workload: Workload, opts: systems.Options, mock_flags: str) -> systems.Engines:
    log = opts.logs / f"{workload.name}-engines.log"
    prefill_args = ["mock", "--role", "prefill", "--port", "0"]
    if workload.prefill_ms_per_token and "--prefill-ms-per-token" in mock_flags:
        prefill_args += ["--prefill-ms-per-token", str(workload.prefill_ms_per_token)]
    decode_args = ["mock", "--role", "decode", "--port", "0", "--itl-ms", str(workload.itl_ms)]
    commands = [(prefill_args, "listening on")] * 2 + [(decode_args, "listening on")] * workload.decode_engines
    started = processes.start_many(commands, log=log)
    urls = [url for _p, url in started]
    return systems.Engines(urls[:2], urls[2:], [p for p, _u in started])


def settle(engines: systems.Engines, timeout: float = 60.0) -> None:
    """Wait until the engines serve nothing (after S4, thousands of aborted streams wind down)."""
    deadline = time.monotonic() + timeout
    for url in engines.prefill + engines.decode:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/stats", timeout=10) as answer:
                    if json.loads(answer.read()).get("in_flight", 0) == 0:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.25)


def loadgen_command(workload: Workload, running: systems.Running, engines: systems.Engines) -> list[str]:
    command = [sys.executable, str(LOADGEN), "--max-tokens", str(workload.max_tokens),
               "--prompt-words", str(workload.prompt_words), "--max-seconds", str(workload.max_seconds)]
    if not workload.stream:
        command.append("--no-stream")
    if running.url is None:
        command += ["--direct-pd", ",".join(engines.prefill), "--decode", ",".join(engines.decode)]
    else:
        command += ["--url", running.url]
    return command


# ------------------------------------------------------------------------------------------ closed loop


def run_closed(workload: Workload, running: systems.Running, engines: systems.Engines,
               opts: systems.Options) -> dict[str, Any]:
    command = [*loadgen_command(workload, running, engines),
               "--requests", str(workload.requests), "--concurrency", str(workload.concurrency),
               "--warmup", str(workload.warmup), "--wait-go", "--progress",
               "--label", f"{workload.name} {running.name}"]
    loadgen = processes.spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                              env=processes.pdproxy_env())
    assert loadgen.stdin is not None and loadgen.stdout is not None
    lines = processes.LineReader(loadgen.stdout)
    try:
        warm = lines.get(workload.max_seconds + 60)
        if warm is None or json.loads(warm).get("event") != "warm":
            raise RuntimeError(f"load generator failed during warm-up (exit {loadgen.poll()})")
        cpu_before = processes.cpu_seconds(running.pids)
        noise = processes.Noise()
        loadgen.stdin.write("go\n")
        loadgen.stdin.flush()
        line = lines.get(workload.max_seconds + 60)
        cpu = processes.cpu_seconds(running.pids) - cpu_before
        others = noise.share()
        if line is None:
            raise RuntimeError(f"load generator exited with code {loadgen.wait(5)} and no result")
        result: dict[str, Any] = json.loads(line)
    finally:
        processes.stop(loadgen)
    result["status"] = "ok"
    result["others_cpu_share"] = others
    if running.measured:
        ok = result["ok"]
        result["proxy_cpu_seconds"] = round(cpu, 3)
        result["cpu_s_per_1k"] = round(cpu * 1000 / ok, 4) if ok else None
        result["peak_rss_mib"] = round(processes.peak_rss_kib(running.pids) / 1024, 1)
        result["proxy_processes"] = len(processes.tree(running.pids))
        if not running.alive():
            result["status"] = "proxy died"
    return result


# ----------------------------------------------------------------------------------------------- scale


class Fleet:
    """S4's load generator processes, each holding its share of the open streams."""

    def __init__(self, workload: Workload, running: systems.Running, engines: systems.Engines,
                 opts: systems.Options) -> None:
        self.workload = workload
        command = [*loadgen_command(workload, running, engines),
                   "--hold-streams", "--open-timeout", "15", "--max-opening", str(MAX_OPENING),
                   "--step-timeout", str(step_timeout(max(workload.steps)))]
        log = opts.logs / f"{workload.name}-{running.name}-loadgen.log"
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: list[processes.LineReader] = []
        for _ in range(workload.loadgen_processes):
            proc = processes.spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, log=log,
                                   env=processes.pdproxy_env())
            self.procs.append(proc)
            self.lines.append(processes.LineReader(proc.stdout))  # type: ignore[arg-type]
        self.ready = [self.expect(i, "ready", 30) for i in range(len(self.procs))]

    def send(self, i: int, command: dict[str, Any]) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()

    def expect(self, i: int, event: str, timeout: float, progress: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines[i].get(deadline - time.monotonic())
            if line is None:
                raise RuntimeError(f"load generator {i} exited (code {self.procs[i].poll()})")
            message = json.loads(line)
            if message.get("event") == event:
                return message
            if progress is not None and message.get("event") == "progress":
                progress(i, message)

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    self.send(i, {"cmd": "close"})
        for i, proc in enumerate(self.procs):
            with contextlib.suppress(Exception):
                self.expect(i, "closed", 30)
            processes.stop(proc)


def step_timeout(target: int) -> float:
    """How long one S4 step may take to open: about 110 s for 16,384 streams, on 2 cores shared by the
    proxy, 6 engines and 4 load generators. Streams live 200 s (100 tokens, one every 2 s), so the
    first step's streams are still open when the last step is measured."""
    return max(30.0, target / 150)


def merge(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0) + value
    return out


def run_scale(workload: Workload, running: systems.Running, engines: systems.Engines,
              opts: systems.Options) -> dict[str, Any]:
    fleet = Fleet(workload, running, engines, opts)
    k = len(fleet.procs)
    pids = running.pids
    baseline_rss = processes.rss_kib(pids) if pids else 0
    cpu_start = processes.cpu_seconds(pids) if pids else 0.0
    out: dict[str, Any] = {"status": "ok", "steps": [], "baseline_rss_mib": round(baseline_rss / 1024, 1),
                           "loadgen_processes": k, "decode_engines": len(engines.decode)}
    try:
        for target in workload.steps:
            shares = [target // k + (1 if i < target % k else 0) for i in range(k)]
            bar = Progress(target, f"{workload.name} {running.name} open streams", unit="stream")
            opened_now = [0] * k

            peak_fds = [0]
            sampled = [0.0]

            def on_progress(i: int, message: dict[str, Any], bar: Progress = bar, now: list[int] = opened_now,
                            peak: list[int] = peak_fds, at: list[float] = sampled) -> None:
                now[i] = message["open"]
                bar.set(sum(now))
                if pids and time.monotonic() - at[0] >= 1.0:  # the fds a proxy process held at most, while opening
                    at[0] = time.monotonic()
                    peak[0] = max([peak[0], *(f for _p, f, _l in processes.open_fds(pids))])

            cpu0 = processes.cpu_seconds(pids) if pids else 0.0
            tcp0 = processes.tcp_counters()
            noise = processes.Noise()
            t0 = time.monotonic()
            for i in range(k):
                fleet.send(i, {"cmd": "open", "target": shares[i], "rate": workload.open_rate / k})
            opened = [fleet.expect(i, "opened", step_timeout(target) + 30, on_progress) for i in range(k)]
            bar.set(sum(m["open"] for m in opened))
            bar.close()
            ramp = time.monotonic() - t0
            for i in range(k):  # start the hold with empty gap buffers
                fleet.send(i, {"cmd": "stats"})
            for i in range(k):
                fleet.expect(i, "stats", 30)
            time.sleep(workload.hold_seconds)
            for i in range(k):
                fleet.send(i, {"cmd": "stats"})
            stats = [fleet.expect(i, "stats", 30) for i in range(k)]
            step = {
                "target": target,
                "open": sum(s["open"] for s in stats),
                "failed": merge([s["failed"] for s in stats]),
                "dropped": merge([s["dropped"] for s in stats]),
                "ramp_seconds": round(ramp, 2),
                "open_ms": summarize([v / 1000 for m in opened for v in m["open_ms"]]),
                "gap_ms": summarize([v / 1000 for s in stats for v in s["gaps_ms"]]),
                "tokens_in_hold": sum(s["tokens"] for s in stats),
                "tcp": {k: v - tcp0.get(k, 0) for k, v in processes.tcp_counters().items()},
                "others_cpu_share": noise.share(),
            }
            step["errors"] = sum(step["failed"].values()) + sum(step["dropped"].values())
            if pids:
                rss = processes.rss_kib(pids)
                fds = processes.open_fds(pids)
                step["proxy_rss_mib"] = round(rss / 1024, 1)
                step["rss_kib_per_stream"] = round((rss - baseline_rss) / step["open"], 2) if step["open"] else None
                step["proxy_fds"] = sum(f for _p, f, _l in fds)
                step["proxy_fd_limit_per_process"] = max((lim for _p, _f, lim in fds), default=0)
                step["proxy_fds_max_process"] = max([peak_fds[0], *(f for _p, f, _l in fds)])
                step["proxy_cpu_seconds"] = round(processes.cpu_seconds(pids) - cpu0, 2)
                step["proxy_processes"] = len(fds)
            reason = stop_reason(step, running)
            if reason:
                step["stopped"] = reason
            out["steps"].append(step)
            print(f"  {workload.name} {running.name}: {step['open']}/{target} open, {step['errors']} errors"
                  + (f", {step['rss_kib_per_stream']} KiB/stream" if step.get("rss_kib_per_stream") else "")
                  + (f" -- stopped: {reason}" if reason else ""), file=sys.stderr, flush=True)
            if reason:
                break
    finally:
        fleet.close()
    last = out["steps"][-1] if out["steps"] else {}
    out["max_open"] = max((s["open"] for s in out["steps"]), default=0)
    out["reached"] = last.get("target") if last and not last.get("stopped") else None
    out["errors"] = sum(s["errors"] for s in out["steps"])
    if pids:
        out["peak_rss_mib"] = round(processes.peak_rss_kib(pids) / 1024, 1)
        out["proxy_cpu_seconds"] = round(processes.cpu_seconds(pids) - cpu_start, 2)
        if not running.alive():
            out["status"] = "proxy died"
    return out


def stop_reason(step: dict[str, Any], running: systems.Running) -> str | None:
    """Why a step did not reach its target with zero errors, as far as we can tell from outside."""
    if step["open"] >= step["target"] and step["errors"] == 0:
        return None
    parts = []
    if running.measured and not running.alive():
        parts.append("the proxy exited")
    limit = step.get("proxy_fd_limit_per_process") or 0
    if limit and step.get("proxy_fds_max_process", 0) >= 0.95 * limit:
        parts.append(f"fd limit: a proxy process held up to {step['proxy_fds_max_process']} of its {limit} fds")
    kinds = merge([step["failed"], step["dropped"]])
    if kinds:
        top = sorted(kinds.items(), key=lambda kv: -kv[1])[:3]
        parts.append("errors: " + ", ".join(f"{v} x {k}" for k, v in top))
    if step["open"] < step["target"] and not kinds:
        parts.append(f"only {step['open']} of {step['target']} opened in time")
    overflows = step.get("tcp", {}).get("ListenOverflows", 0)
    if overflows:
        parts.append(f"{overflows} listen-queue overflows on this machine during the step (SYNs dropped, retried)")
    return "; ".join(parts) or f"{step['open']} of {step['target']} open"


# ---------------------------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = processes.raise_nofile_limit()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    logs = Path(args.logs) if args.logs else Path(f"/tmp/pdproxy-bench-{stamp}-{os.getpid()}")
    logs.mkdir(parents=True, exist_ok=True)
    opts = systems.Options(logs=logs, policy=args.policy, fd_limit=soft, install=not args.no_install,
                           pdproxy_workers=args.pdproxy_workers, nginx_workers=args.nginx_workers)
    all_workloads = tiny_workloads() if args.tiny else make_workloads(args.quick, soft)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in all_workloads]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {sorted(all_workloads)}")
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in systems.ALL]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {list(SYSTEM_ORDER)}")
    if args.requests:
        all_workloads = {k: replace(w, requests=args.requests) if not w.scale else w for k, w in all_workloads.items()}

    mock_flags = subprocess.run([sys.executable, "-m", "pdproxy", "mock", "--help"], capture_output=True, text=True,
                                env=processes.pdproxy_env(), timeout=60).stdout
    print(f"pdproxy benchmark: systems {', '.join(names)}; workloads {', '.join(chosen)}; logs in {logs}",
          file=sys.stderr, flush=True)
    prepared: dict[str, systems.System] = {}
    skipped: dict[str, str] = {}
    for name in names:
        system = systems.ALL[name]()
        try:
            system.prepare(opts)
            prepared[name] = system
        except systems.Skip as exc:
            skipped[name] = str(exc)
            print(f"  {name}: skipped: {exc}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "meta": {**meta(args, opts, prepared, skipped, soft, hard), "repeat": args.repeat,
                 "retry_disturbed": args.retry_disturbed, "max_others": args.max_others},
        "systems": {name: {"description": systems.ALL[name].description,
                           "version": prepared[name].version if name in prepared else None,
                           "skipped": skipped.get(name)} for name in names},
        "workloads": {},
    }
    for wname in chosen:
        workload = all_workloads[wname]
        entry: dict[str, Any] = {"spec": asdict(workload), "title": workload.title, "results": {}}
        results["workloads"][wname] = entry
        print(f"{wname}: {workload.title}", file=sys.stderr, flush=True)
        try:
            engines = start_engines(workload, opts, mock_flags)
        except (RuntimeError, OSError) as exc:
            for name in names:
                entry["results"][name] = {"status": "failed", "reason": f"mock engines did not start: {exc}"}
            continue
        try:
            for name in names:  # the report keeps this order
                entry["results"][name] = {"status": "skipped", "reason": skipped.get(name, "")}
            active = [prepared[name] for name in names if name not in skipped]
            if workload.scale:
                for system in active:
                    settle(engines)
                    entry["results"][system.name] = run_one(system, workload, engines, opts)
            else:
                entry["results"].update(run_rounds(active, workload, engines, opts, args.repeat, args.retry_disturbed,
                                                   args.max_others))
        finally:
            processes.stop_all(engines.processes)
    results["targets"] = report.targets(results)
    return results


def run_rounds(active: list[systems.System], workload: Workload, engines: systems.Engines, opts: systems.Options,
               repeat: int, retries: int = 0, max_others: float = 1.0) -> dict[str, dict[str, Any]]:
    """A closed-loop workload: every system started, then `repeat` rounds, each running every system once
    (in an order rotated per round, so slow drifts of a noisy machine spread over all). A run during which
    other work used more than `max_others` of the machine is run again, up to `retries` times. Each
    system's result is its least disturbed run (the median throughput among runs as clean); all runs are
    kept under `runs`."""
    out: dict[str, dict[str, Any]] = {}
    running: dict[str, systems.Running] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for system in active:
            try:
                running[system.name] = system.start(engines, opts, workload)
                runs[system.name] = []
            except systems.Skip as exc:
                print(f"  {workload.name} {system.name}: skipped: {exc}", file=sys.stderr, flush=True)
                out[system.name] = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # one system's failure never ends the run
                print(f"  {workload.name} {system.name}: failed to start: {exc!r}", file=sys.stderr, flush=True)
                out[system.name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        names = list(running)
        for round_ in range(repeat):
            shift = round_ % max(1, len(names))
            for name in names[shift:] + names[:shift]:
                for attempt in range(1 + retries):
                    try:
                        result = run_closed(workload, running[name], engines, opts)
                    except Exception as exc:
                        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                    runs[name].append(result)
                    label = f" (run {round_ + 1}/{repeat})" if repeat > 1 else ""
                    share = result.get("others_cpu_share") or 0.0
                    print(f"  {workload.name} {name}{label}: {report.one_line(result)}", file=sys.stderr, flush=True)
                    if share <= max_others or attempt == retries:
                        break
                    print(f"    others used {share:.0%} of the machine during that run: running it again",
                          file=sys.stderr, flush=True)
        for name in names:
            out[name] = median_run(runs[name])
            if running[name].notes:
                out[name]["notes"] = running[name].notes
    finally:
        for item in running.values():
            item.stop()
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r.get("status") == "ok"]
    if not good:
        return runs[0]
    # The cleanest runs: within 5 points of the least disturbed one; of those, the median throughput.
    least = min(r.get("others_cpu_share", 0.0) for r in good)
    clean = sorted((r for r in good if r.get("others_cpu_share", 0.0) <= least + 0.05),
                   key=lambda r: r["requests_per_second"])
    chosen = dict(clean[(len(clean) - 1) // 2])
    if len(runs) > 1:
        chosen["runs"] = [{"status": r.get("status"), "requests_per_second": r.get("requests_per_second"),
                           "cpu_s_per_1k": r.get("cpu_s_per_1k"),
                           "ttft_p50_ms": (r.get("ttft_ms") or {}).get("p50"),
                           "others_cpu_share": r.get("others_cpu_share")} for r in runs]
    return chosen


def run_one(system: systems.System, workload: Workload, engines: systems.Engines,
            opts: systems.Options) -> dict[str, Any]:
    running: systems.Running | None = None
    try:
        running = system.start(engines, opts, workload)
        result = run_scale(workload, running, engines, opts)
        if running.notes:
            result["notes"] = running.notes
        return result
    except systems.Skip as exc:
        print(f"  {workload.name} {system.name}: skipped: {exc}", file=sys.stderr, flush=True)
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # one system's failure never ends the run
        print(f"  {workload.name} {system.name}: failed: {exc!r}", file=sys.stderr, flush=True)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if running is not None:
            running.stop()


def meta(args: argparse.Namespace, opts: systems.Options, prepared: dict[str, systems.System],
         skipped: dict[str, str], soft: int, hard: int) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                          text=True, timeout=10).stdout.strip():
            commit += " (src/ modified)"
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "host": {"cpus": os.cpu_count(), "cpu": cpu_model, "kernel": platform.release(),
                 "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())},
        "pdproxy_commit": commit,
        "fd_limit": {"soft": soft, "hard": hard},
        "policy": opts.policy,
        "logs": str(opts.logs),
        "versions": {name: s.version for name, s in prepared.items()},
        "skipped": skipped,
    }


def write_outputs(results: dict[str, Any], out: Path, name: str, plot: bool, keep_meta: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if not keep_meta:
        results["meta"]["load_avg_at_end"] = list(os.getloadavg())
    json_path, md_path, png_path = out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    written = [json_path]
    chart_note = None
    if plot:
        try:
            python = plotting_python()
            done = subprocess.run([python, str(HERE / "plot.py"), str(json_path), str(png_path)], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                chart_note = f"chart failed: {done.stderr.strip()[-300:]}"
            else:
                written.append(png_path)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            chart_note = f"chart skipped: {exc}"
    md_path.write_text(report.markdown(results, png_path.name if png_path in written else None, chart_note))
    written.insert(1, md_path)
    return written


def plotting_python() -> str:
    """A Python with matplotlib: this one, or benchmarks/.venvs/plot (created on first use)."""
    check = "import matplotlib"
    if subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=120).returncode == 0:
        return sys.executable
    venv = systems.VENVS / "plot"
    python = venv / "bin" / "python"
    if not (python.exists() and subprocess.run([str(python), "-c", check], capture_output=True,
                                               timeout=120).returncode == 0):
        print(f"  installing matplotlib into {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "matplotlib"], capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"pip install matplotlib failed: {done.stderr.strip()[-300:]}")
    return str(python)


DEPENDENCIES = ("aiohttp", "orjson", "uvloop", "pydantic", "pydantic_settings", "prometheus_client", "yaml")


def bootstrap() -> None:
    """Run under a Python that has pdproxy's dependencies: this one, or benchmarks/.venvs/harness."""
    missing = [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if os.environ.get("PDPROXY_BENCH_BOOTSTRAPPED"):
        raise SystemExit(f"pdproxy's dependencies {missing} are missing even in {sys.executable}")
    venv = systems.VENVS / "harness"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"{sys.executable} lacks {', '.join(missing)}: installing pdproxy's dependencies into {venv} ...",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT), "tqdm"], check=True, timeout=1800)
    os.environ["PDPROXY_BENCH_BOOTSTRAPPED"] = "1"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--tiny", action="store_true", help="a few requests per system (the test suite's smoke run)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help="comma list (default: all but pdproxy-unshared)")
    parser.add_argument("--workloads", default="S1,S2,S3,L1,S4", help="comma list (default: S1,S2,S3,L1,S4)")
    parser.add_argument("--requests", type=int, default=0, help="override the request count of S1-S3 and L1")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of each closed-loop workload (systems interleaved); the median run is reported")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for NAME.json/.md/.png")
    parser.add_argument("--name", help="file name stem (default: benchmark, or quick with --quick)")
    parser.add_argument("--retry-disturbed", type=int, default=2, metavar="N",
                        help="run a closed-loop measurement again, up to N times, when other work used more than "
                             "--max-others of the machine during it (default 2)")
    parser.add_argument("--max-others", type=float, default=0.15, metavar="SHARE",
                        help="share of the machine's CPU others may use during a clean run (default 0.15)")
    parser.add_argument("--policy", default="round_robin", help="balancing policy given to every proxy")
    parser.add_argument("--pdproxy-workers", type=int, help="pdproxy --workers N everywhere (if it has the option)")
    parser.add_argument("--nginx-workers", type=int, help="nginx worker_processes (default 1; S4: what fds need)")
    parser.add_argument("--no-install", action="store_true", help="never install: skip what is missing")
    parser.add_argument("--no-plot", action="store_true", help="no PNG chart")
    parser.add_argument("--logs", help="directory for the processes' logs (default: a new one under /tmp)")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: write the .md (and .png) of a results file again")
    args = parser.parse_args(argv)
    if args.render:
        source = Path(args.render)
        results = json.loads(source.read_text())
        results["targets"] = report.targets(results)
        for path in write_outputs(results, source.parent, source.stem, plot=not args.no_plot, keep_meta=True):
            print(path)
        return 0
    if argv is None:
        bootstrap()

    def terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        processes.stop_started()
    results["meta"]["left_running"] = processes.leftovers()
    name = args.name or ("tiny" if args.tiny else "quick" if args.quick else "benchmark")
    written = write_outputs(results, Path(args.out), name, plot=not args.no_plot)
    print(report.markdown_tables(results), flush=True)
    print(f"done in {time.monotonic() - started:.0f}s; results:", flush=True)
    for path in written:
        print(f"  {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
