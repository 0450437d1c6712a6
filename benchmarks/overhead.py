"""Proxy overhead against the direct-PD floor, measured in the same run.

    python benchmarks/overhead.py [--requests 2000] [--concurrency 64] [--max-tokens 64]

Starts 2 prefill + 1 decode mock engines (`pdproxy mock`, no delays: the proxy is the bottleneck)
and pdproxy, as separate processes on loopback; runs benchmarks/loadgen.py first with the load
generator doing the PD flow itself (`direct-pd`), then through pdproxy; reads the proxy's CPU time
from /proc/<pid>/stat; prints a JSON summary with the ratios; stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import start, start_mock, stop_all  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loadgen(args: argparse.Namespace, *target: str) -> dict[str, object]:
    command = [sys.executable, str(HERE / "loadgen.py"), *target, "--requests", str(args.requests),
               "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens)]
    if args.no_stream:
        command.append("--no-stream")
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()

    processes: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for role in ("prefill", "prefill", "decode"):
            process, url = start_mock(role)
            processes.append(process)
            urls.append(url)
        proxy, proxy_url = start("--prefill-servers", f"{urls[0]},{urls[1]}", "--decode-servers", urls[2],
                                 "--host", "127.0.0.1", "--port", "0", "--no-access-log",
                                 marker="pdproxy listening on")
        processes.append(proxy)
        loadgen(argparse.Namespace(**{**vars(args), "requests": 200}), "--url", proxy_url)  # warm-up
        direct = loadgen(args, "--direct-pd", f"{urls[0]},{urls[1]}", "--decode", urls[2])
        cpu_before = cpu_seconds(proxy.pid)
        proxied = loadgen(args, "--url", proxy_url)
        cpu = cpu_seconds(proxy.pid) - cpu_before
        result = {
            "workload": {"requests": args.requests, "concurrency": args.concurrency,
                         "max_tokens": args.max_tokens, "stream": not args.no_stream},
            "direct-pd": direct,
            "pdproxy": proxied,
            "pdproxy_cpu_ms_per_request": round(cpu * 1000 / max(1, int(proxied["ok"])), 3),
            "pdproxy_peak_rss_mib": round(peak_rss_mib(proxy.pid), 1),
            "throughput_ratio_vs_direct": round(proxied["requests_per_second"] / direct["requests_per_second"], 3),
        }
        print(json.dumps(result, indent=2))
    finally:
        stop_all(processes)


if __name__ == "__main__":
    main()
