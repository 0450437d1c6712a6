"""Start, measure and stop the processes of a benchmark (loopback only, stopped by PID).

Every process started here is registered, gets its own session (so its process group is its PID)
and is sent SIGTERM if the benchmark itself dies (PR_SET_PDEATHSIG). `stop_started()` in a
`finally` stops whatever is still running: SIGTERM to the group, SIGKILL after a grace period.
Measurements read /proc: CPU seconds and RSS of a process tree (a proxy with worker processes is
measured as the sum of its tree).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

URL = re.compile(r"(http://127\.0\.0\.1:\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_STARTED: list[subprocess.Popen[Any]] = []
_EVER: list[int] = []  # every PID started, for `leftovers()`
_LOCK = threading.Lock()


try:
    _PRCTL: Any = ctypes.CDLL(None).prctl  # looked up here: the child between fork and exec only calls it
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _PRCTL = None


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: SIGTERM when the benchmark dies


def spawn(command: Sequence[str], *, log: Path | None = None, stdin: int | None = subprocess.DEVNULL,
          stdout: int | None = None, stderr: int | None = subprocess.STDOUT, env: dict[str, str] | None = None,
          text: bool = True) -> subprocess.Popen[Any]:
    """Start `command` in its own session and register it.

    Without `stdout`, its output (stderr merged) is appended to `log`, or dropped. With
    `stdout=PIPE` the caller reads stdout; stderr goes to `log` if given, else as `stderr` says
    (None: our terminal, for progress bars).
    """
    handle = open(log, "ab") if log is not None else None  # closed below: the child keeps its own copy
    if stdout is None:
        out: Any = handle if handle is not None else subprocess.DEVNULL
        err: Any = subprocess.STDOUT
    else:
        out = stdout
        err = handle if handle is not None else stderr
    try:
        process = subprocess.Popen(list(command), stdin=stdin, stdout=out, stderr=err, env=env, text=text,
                                   start_new_session=True, preexec_fn=_child_setup)
    finally:
        if handle is not None:
            handle.close()
    with _LOCK:
        _STARTED.append(process)
        _EVER.append(process.pid)
    return process


def stop(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM to the process's group (its own session), SIGKILL after `grace` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    else:
        # The leader is gone; stragglers in its group (workers) still go.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with _LOCK:
        if process in _STARTED:
            _STARTED.remove(process)


def stop_all(processes: Iterable[subprocess.Popen[Any]]) -> None:
    """Stop these processes: SIGTERM to all first, then wait for each."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        stop(process)


def stop_started() -> None:
    """Stop every process this module started and that is still registered."""
    with _LOCK:
        started = list(_STARTED)
    stop_all(reversed(started))


def leftovers() -> list[int]:
    """PIDs this module started that still run (not zombies): empty after `stop_started()`."""
    alive = []
    for pid in _EVER:
        with contextlib.suppress(OSError, IndexError):
            if _stat_fields(pid)[0] != "Z":
                alive.append(pid)
    return alive


def start(*args: str, marker: str, log: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    """Run `python -m pdproxy ARGS`; return the process and the URL on its first line with `marker`."""
    return start_many([(args, marker)], log=log)[0]


def start_many(commands: Sequence[tuple[Sequence[str], str]], log: Path | None = None
               ) -> list[tuple[subprocess.Popen[str], str]]:
    """Start several `python -m pdproxy ARGS` at once; see `start_servers`."""
    return start_servers([([sys.executable, "-m", "pdproxy", *args], marker) for args, marker in commands], log=log)


def start_servers(commands: Sequence[tuple[Sequence[str], str]], log: Path | None = None,
                  env: dict[str, str] | None = None) -> list[tuple[subprocess.Popen[str], str]]:
    """Start several servers at once (from this thread: see PR_SET_PDEATHSIG), then wait for each one's
    output line with its marker and a loopback URL; return (process, url) pairs. Output goes on to `log`."""
    env = env if env is not None else pdproxy_env()
    processes = [spawn(command, stdout=subprocess.PIPE, env=env) for command, _marker in commands]
    started: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for process, (command, marker) in zip(processes, commands, strict=True):
            started.append((process, _wait_marker(process, command, marker, log)))
    except BaseException:
        stop_all(processes)
        raise
    return started


def _wait_marker(process: subprocess.Popen[str], args: Sequence[str], marker: str, log: Path | None) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line and (match := URL.search(line)):
            threading.Thread(target=_drain, args=(process.stdout, log, seen), daemon=True).start()
            return match.group(1)
    tail = "".join(seen[-5:]).strip()
    raise RuntimeError(f"{' '.join(args[1:])} did not start: {tail or 'no output'}")


def _drain(stream: IO[str], log: Path | None, seen: list[str]) -> None:
    """Keep reading a child's output so a full pipe never blocks it (appended to `log` when given)."""
    with contextlib.suppress(Exception):
        if log is None:
            for _ in stream:
                pass
        else:
            with open(log, "a", buffering=1) as out:
                out.writelines(seen)
                for line in stream:
                    out.write(line)


def start_mock(role: str, *extra: str, log: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    return start("mock", "--role", role, "--port", "0", *extra, marker="listening on", log=log)


def pdproxy_env() -> dict[str, str]:
    """The environment for `python -m pdproxy`: this checkout's src/ first on PYTHONPATH."""
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ------------------------------------------------------------------------------------------------ system


def free_port() -> int:
    """A loopback port that was free a moment ago (for programs that cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (children inherit it); return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def wait_port(port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree(pids: Iterable[int]) -> list[int]:
    """These processes and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [p for p in pids if Path(f"/proc/{p}").exists()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of these process trees, reaped children included.

    A live process counts its own time; a child that exited counts in its parent's cutime/cstime
    once reaped, or in its own stat while it is a zombie: nothing is counted twice.
    """
    total = 0
    for pid in tree(pids):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_kib(pids: Iterable[int]) -> int:
    """Resident set (VmRSS) of these process trees, in KiB."""
    return sum(_status_kib(pid, "VmRSS:") for pid in tree(pids))


def peak_rss_kib(pids: Iterable[int]) -> int:
    """Peak resident set (VmHWM) of these process trees, summed, in KiB."""
    return sum(_status_kib(pid, "VmHWM:") for pid in tree(pids))


def open_fds(pids: Iterable[int]) -> list[tuple[int, int, int]]:
    """(pid, open fds, soft fd limit) for each process of these trees."""
    out = []
    for pid in tree(pids):
        try:
            count = len(os.listdir(f"/proc/{pid}/fd"))
            limit = 0
            for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    limit = int(line.split()[3])
            out.append((pid, count, limit))
        except (OSError, ValueError, IndexError):
            continue
    return out


class LineReader:
    """Lines of a child's stdout, read by a daemon thread, taken with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with contextlib.suppress(Exception):
            for line in stream:
                self._queue.put(line)
        self._queue.put(None)

    def get(self, timeout: float) -> str | None:
        """The next line; None at end of output; raises TimeoutError when none came in time."""
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TimeoutError(f"no output in {timeout:.0f}s") from None


def tcp_counters() -> dict[str, int]:
    """The kernel's listen-queue overflow and SYN retransmit counters (this network namespace, everyone's)."""
    wanted = {"ListenOverflows", "ListenDrops", "TCPSynRetrans"}
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            if head.startswith("TcpExt:"):
                for key, value in zip(head.split()[1:], values.split()[1:], strict=False):
                    if key in wanted:
                        out[key] = int(value)
    return out


def busy_seconds() -> float:
    """CPU time spent on this machine by everyone, all CPUs together (from /proc/stat)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


class Noise:
    """How much of the machine others used while we measured: (busy CPU - ours) / (elapsed x CPUs).

    'Ours' is this process's tree: every process the benchmark started. Other work on the machine
    (another test suite, a build) disturbs the numbers; this says by how much.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = busy_seconds()
        self.own0 = cpu_seconds([os.getpid()])

    def share(self) -> float:
        elapsed = time.monotonic() - self.t0
        if elapsed <= 0:
            return 0.0
        foreign = (busy_seconds() - self.busy0) - (cpu_seconds([os.getpid()]) - self.own0)
        return round(max(0.0, foreign) / (elapsed * (os.cpu_count() or 1)), 3)
