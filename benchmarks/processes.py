"""Start and stop `pdproxy` processes for benchmark scripts (loopback only, stopped by PID)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

URL = re.compile(r"(http://127\.0\.0\.1:\d+)")


def start(*args: str, marker: str) -> tuple[subprocess.Popen[str], str]:
    """Run `python -m pdproxy ARGS`; return the process and the URL on its first line with `marker`."""
    process = subprocess.Popen([sys.executable, "-m", "pdproxy", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if marker in line and (match := URL.search(line)):
            # Keep draining its output so a full pipe never blocks it.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, match.group(1)
    process.kill()
    raise RuntimeError(f"pdproxy {' '.join(args)} did not start")


def start_mock(role: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    return start("mock", "--role", role, "--port", "0", *extra, marker="listening on")


def stop_all(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
