"""The systems under test: how each is installed, started on loopback, made ready and stopped.

`direct-pd` (no proxy: the load generator runs the PD flow itself), `pdproxy`, `nginx` (pass-through
to the decode engines only), `vllm-router` and `sglang-router` (PyPI wheels, each in its own venv
under benchmarks/.venvs/, in their PD modes). A system that cannot be installed or started raises
`Skip` with the reason; the harness reports it and goes on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import processes

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
VLLM_ROUTER_SPEC = "vllm-router==0.1.17"
SGLANG_ROUTER_SPEC = "sglang-router==0.3.2"


class Skip(Exception):
    """This system cannot run here; `str()` says why."""


@dataclass
class Engines:
    """The mock engines of one workload."""

    prefill: list[str]
    decode: list[str]
    processes: list[subprocess.Popen[Any]]
    ttft_ms: float = 0.0


@dataclass
class Running:
    """A started system. `measured` are the proxy's processes (their trees are summed for CPU and RSS);
    `owned` is everything to stop afterwards, helpers included."""

    name: str
    url: str | None  # None: direct-pd (the load generator talks to the engines)
    measured: list[subprocess.Popen[Any]] = field(default_factory=list)
    owned: list[subprocess.Popen[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.measured]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.measured)

    def stop(self) -> None:
        processes.stop_all(reversed(self.owned))


@dataclass
class Options:
    """Harness-wide settings a system needs."""

    logs: Path
    policy: str = "round_robin"
    fd_limit: int = 1024
    install: bool = True
    pdproxy_workers: int | None = None  # None: 1, or what the fd budget needs (S4) when pdproxy has --workers
    nginx_workers: int | None = None  # None: 1, or what the fd budget needs (S4)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, colours stripped, for a skip reason."""
    try:
        text = ANSI.sub("", path.read_text(errors="replace")).strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:160] for line in text[-lines:])


def probe(url: str, timeout: float, process: subprocess.Popen[Any] | None = None, log: Path | None = None) -> None:
    """Wait until one small completion through `url` answers 200 (the system routes end to end)."""
    body = json.dumps({"model": "mock", "prompt": "ready?", "max_tokens": 2, "stream": False}).encode()
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise Skip(f"exited with code {process.returncode} while starting: {_log_tail(log) if log else ''}")
        request = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                if answer.status == 200:
                    return
                last = f"status {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}: {exc.read()[:200]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise Skip(f"no good answer to a test request within {timeout:.0f}s (last: {last}); log: "
               f"{_log_tail(log) if log else ''}".strip())


def _venv(name: str, spec: str, binary: str, opts: Options) -> Path:
    """benchmarks/.venvs/NAME with `spec` installed; returns the path of `binary` in it."""
    venv = VENVS / name
    exe = venv / "bin" / binary
    if exe.exists():
        return exe
    if not opts.install:
        raise Skip(f"not installed ({exe} missing) and --no-install given")
    VENVS.mkdir(parents=True, exist_ok=True)
    log = VENVS / f"{name}.install.log"
    print(f"  installing {spec} into {venv} (log: {log}) ...", file=sys.stderr, flush=True)
    with open(log, "w") as out:
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out, timeout=300)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], check=True, stdout=out,
                           stderr=out, timeout=1200)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            raise Skip(f"pip install {spec} failed ({exc}): {_log_tail(log, 3)}") from None
    if not exe.exists():
        raise Skip(f"{spec} installed no {binary} executable")
    return exe


def _package_version(exe: Path, dist: str) -> str:
    try:
        done = subprocess.run([str(exe.parent / "python"), "-c",
                               f"import importlib.metadata as m; print(m.version({dist!r}))"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


class System:
    """One system under test. `prepare` runs once per harness run (install); `start` once per workload."""

    name = ""
    description = ""

    def __init__(self) -> None:
        self.version = ""

    def prepare(self, opts: Options) -> None:
        """Install what is needed; raise Skip if that is not possible."""

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        raise NotImplementedError


class DirectPD(System):
    name = "direct-pd"
    description = "no proxy: the load generator itself does prefill (round robin) then decode (the floor)"

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        return Running(self.name, None)


class PdProxy(System):
    name = "pdproxy"
    description = "this project: `python -m pdproxy`, access log off"
    extra_args: tuple[str, ...] = ()

    def prepare(self, opts: Options) -> None:
        done = subprocess.run([sys.executable, "-m", "pdproxy", "serve", "--help"], capture_output=True, text=True,
                              env=processes.pdproxy_env(), timeout=60)
        if done.returncode != 0:
            raise Skip(f"`python -m pdproxy` does not run: {done.stderr.strip()[-300:]}")
        self.has_workers = "--workers" in done.stdout
        self.version = subprocess.run([sys.executable, "-m", "pdproxy", "--version"], capture_output=True, text=True,
                                      env=processes.pdproxy_env(), timeout=60).stdout.strip()

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        log = opts.logs / f"{workload.name}-{self.name}.log"
        args = ["--prefill-servers", ",".join(engines.prefill), "--decode-servers", ",".join(engines.decode),
                "--host", "127.0.0.1", "--port", "0", "--no-access-log",
                "--prefill-policy", opts.policy, "--decode-policy", opts.policy, *self.extra_args]
        running = Running(self.name, None)
        workers = opts.pdproxy_workers or workload.proxy_processes
        if workers > 1:
            if self.has_workers:
                args += ["--workers", str(workers), "--metrics-port", str(processes.free_port())]
                running.notes.append(f"--workers {workers}")
            else:
                running.notes.append(f"one process (no --workers option; {workers} would fit the fd limit)")
        try:
            ((process, url),) = processes.start_many([(args, "pdproxy listening on")], log=log)
        except RuntimeError as exc:
            raise Skip(str(exc)) from None
        running.url = url
        running.measured.append(process)
        running.owned.append(process)
        probe(url, 30, process, log)
        return running


class PdProxyUnshared(PdProxy):
    name = "pdproxy-unshared"
    description = ("pdproxy with --no-shared-routing: with --pdproxy-workers N each worker routes on its own counts "
                   "(the cost of the shared routing table, against `pdproxy` in the same run)")
    extra_args = ("--no-shared-routing",)


class Floor(System):
    name = "floor"
    description = ("benchmarks/floor_proxy.py: a bare PD proxy on raw asyncio protocols (httptools, uvloop), no "
                   "error handling, health, metrics or timeouts: a floor, not a product")

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        log = opts.logs / f"{workload.name}-{self.name}.log"
        command = [sys.executable, str(HERE / "floor_proxy.py"), "--prefill", ",".join(engines.prefill),
                   "--decode", ",".join(engines.decode), "--port", "0"]
        if workload.proxy_processes > 1:
            raise Skip("one process only: it cannot hold this many streams under the fd limit")
        try:
            ((process, url),) = processes.start_servers([(command, "listening on")], log=log)
        except RuntimeError as exc:
            raise Skip(str(exc)) from None
        running = Running(self.name, url, [process], [process])
        try:
            probe(url, 30, process, log)
        except BaseException:
            running.stop()
            raise
        return running


class Nginx(System):
    name = "nginx"
    description = "nginx from Debian, plain reverse proxy to the decode engines only (no prefill: a C proxy's ceiling)"

    def prepare(self, opts: Options) -> None:
        exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if exe is None:
            if not opts.install:
                raise Skip("nginx not installed and --no-install given")
            if os.geteuid() != 0 or shutil.which("apt-get") is None:
                raise Skip("nginx not installed (and no root apt-get to install it)")
            print("  installing nginx (apt-get install -y nginx) ...", file=sys.stderr, flush=True)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            log = VENVS / "nginx.install.log"
            VENVS.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "nginx"]):
                    try:
                        subprocess.run(command, stdout=out, stderr=out, env=env, timeout=900, check=True)
                    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                        raise Skip(f"{' '.join(command)} failed ({exc}): {_log_tail(log, 3)}") from None
            exe = shutil.which("nginx") or "/usr/sbin/nginx"
            if not Path(exe).exists():
                raise Skip("apt-get install nginx gave no nginx binary")
        self.exe = exe
        done = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=30)
        self.version = (done.stderr or done.stdout).strip().replace("nginx version: ", "")

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        workers = opts.nginx_workers or workload.proxy_processes
        prefix = opts.logs / f"nginx-{workload.name}"
        prefix.mkdir(parents=True, exist_ok=True)
        prefix.chmod(0o755)  # the worker (user nobody) reads its temp dirs here
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(exist_ok=True)
        port = processes.free_port()
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in engines.decode)
        conf = f"""# generated by benchmarks/harness.py: a plain pass-through to the decode engines
worker_processes {workers};
worker_rlimit_nofile {opts.fd_limit};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {max(1024, opts.fd_limit - 64)};
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 100m;
    upstream decode {{
{servers}
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://decode;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
        (prefix / "nginx.conf").write_text(conf)
        log = opts.logs / f"{workload.name}-{self.name}.log"
        process = processes.spawn([self.exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                   "-e", str(prefix / "error.log")], log=log)
        running = Running(self.name, f"http://127.0.0.1:{port}", [process], [process],
                          [f"worker_processes {workers}"])
        try:
            if not processes.wait_port(port, 15, process):
                raise Skip(f"nginx did not listen: {_log_tail(log)} {_log_tail(prefix / 'error.log')}")
            probe(running.url or "", 15, process, prefix / "error.log")
        except BaseException:
            running.stop()
            raise
        return running


class VllmRouter(System):
    name = "vllm-router"
    description = f"{VLLM_ROUTER_SPEC} (Rust), --vllm-pd-disaggregation (NIXL), in benchmarks/.venvs/vllm-router"

    def prepare(self, opts: Options) -> None:
        self.exe = _venv("vllm-router", VLLM_ROUTER_SPEC, "vllm-router", opts)
        self.version = _package_version(self.exe, "vllm-router")

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        port, metrics = processes.free_port(), processes.free_port()
        command = [str(self.exe), "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation",
                   "--kv-connector", "nixl", "--policy", opts.policy,
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics), "--log-level", "warning"]
        for url in engines.prefill:
            command += ["--prefill", url]
        for url in engines.decode:
            command += ["--decode", url]
        log = opts.logs / f"{workload.name}-{self.name}.log"
        process = processes.spawn(command, log=log)
        running = Running(self.name, f"http://127.0.0.1:{port}", [process], [process])
        try:
            probe(running.url or "", 60, process, log)
        except BaseException:
            running.stop()
            raise
        return running


class SglangRouter(System):
    name = "sglang-router"
    description = (f"{SGLANG_ROUTER_SPEC} (Rust), --pd-disaggregation (SGLang's protocol: P and D at once), "
                   "with benchmarks/sglang_prefill.py as its prefill servers")

    def prepare(self, opts: Options) -> None:
        self.exe = _venv("sglang-router", SGLANG_ROUTER_SPEC, "sglang-router", opts)
        self.version = _package_version(self.exe, "sglang-router")

    def start(self, engines: Engines, opts: Options, workload: Any) -> Running:
        log = opts.logs / f"{workload.name}-{self.name}.log"
        shim = [sys.executable, str(HERE / "sglang_prefill.py"), "--port", "0", "--ttft-ms", str(engines.ttft_ms)]
        try:
            shims = processes.start_servers([(shim, "listening on")] * len(engines.prefill), log=log)
        except RuntimeError as exc:
            raise Skip(f"SGLang-style prefill mock: {exc}") from None
        running = Running(self.name, None, [], [p for p, _ in shims],
                          ["P: sglang_prefill.py"])
        try:
            port, metrics = processes.free_port(), processes.free_port()
            command = [str(self.exe), "launch", "--host", "127.0.0.1", "--port", str(port), "--pd-disaggregation",
                       "--policy", opts.policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics),
                       "--log-level", "warn", "--shutdown-grace-period-secs", "1"]
            for _p, url in shims:
                command += ["--prefill", url]
            for url in engines.decode:
                command += ["--decode", url]
            process = processes.spawn(command, log=log)
            running.measured.append(process)
            running.owned.append(process)
            running.url = f"http://127.0.0.1:{port}"
            probe(running.url, 60, process, log)
        except BaseException:
            running.stop()
            raise
        return running


ALL: dict[str, type[System]] = {cls.name: cls for cls in (DirectPD, PdProxy, PdProxyUnshared, Floor, Nginx, VllmRouter,
                                                            SglangRouter)}
