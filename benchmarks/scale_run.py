"""Grow 1P1D to 3P2D and shrink it back with `pdproxy upstreams`, while a load generator runs.

    python benchmarks/scale_run.py [--requests 6000] [--concurrency 32]

Everything is a separate process on loopback: 5 mock engines, the proxy (admin token set,
fast health checks), the load generator (benchmarks/loadgen.py), and the CLI calls an operator
would make. Prints each step and the load generator's summary: the number of failed requests
is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from processes import start, start_mock, stop_all  # noqa: E402

TOKEN = "scale-run-token"


def cli(admin_url: str, *args: str) -> str:
    env = {**os.environ, "PDPROXY_ADMIN_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-m", "pdproxy", "upstreams", "--admin-url", admin_url, *args],
                          capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


def wait_until(admin_url: str, check: Callable[[str], bool], what: str, timeout: float = 30) -> None:
    """Poll `pdproxy upstreams list` (as an operator would) until `check(table)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(cli(admin_url, "list")):
            return
        time.sleep(0.2)
    raise TimeoutError(f"not reached: {what}\n{cli(admin_url, 'list')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    processes: list[subprocess.Popen[str]] = []
    try:
        engines = {}
        for name, role in (("p1", "prefill"), ("p2", "prefill"), ("p3", "prefill"), ("d1", "decode"),
                           ("d2", "decode")):
            process, url = start_mock(role, "--ttft-ms", "5", "--itl-ms", "2")
            processes.append(process)
            engines[name] = url
        proxy, url = start("--prefill-servers", engines["p1"], "--decode-servers", engines["d1"], "--host",
                           "127.0.0.1", "--port", "0", "--no-access-log", "--admin-token", TOKEN,
                           "--health-interval", "0.5", marker="pdproxy listening on")
        processes.append(proxy)
        load = subprocess.Popen([sys.executable, str(HERE / "loadgen.py"), "--url", url, "--requests",
                                 str(args.requests), "--concurrency", str(args.concurrency), "--max-tokens", "32"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        for name in ("p2", "p3", "d2"):
            role = "prefill" if name.startswith("p") else "decode"
            print(cli(url, "add", role, engines[name]), flush=True)
        wait_until(url, lambda table: table.count("healthy") == 5, "5 healthy upstreams")
        print("3P2D, all healthy:\n" + cli(url, "list"), flush=True)
        time.sleep(2)
        for name in ("p2", "p3", "d2"):
            role = "prefill" if name.startswith("p") else "decode"
            print(cli(url, "remove", role, engines[name]), flush=True)
        wait_until(url, lambda table: len(table.splitlines()) == 3, "back to 2 upstreams")
        print("back to 1P1D:\n" + cli(url, "list"), flush=True)
        output, _ = load.communicate(timeout=300)
        print(json.dumps(json.loads(output), indent=2))
    finally:
        stop_all(processes)


if __name__ == "__main__":
    main()
