"""`pdproxy serve --workers N`: several worker processes share the port, like nginx's worker_processes.

Why: a process may hold only so many open files (RLIMIT_NOFILE) and a proxied stream holds two
sockets; an event loop also uses one core. Each worker runs the normal `build_app` and listens on
the same host:port with SO_REUSEPORT, so the kernel spreads new connections over the workers.

The `serve` process becomes the supervisor. It
- reserves the port first: a socket bound with SO_REUSEPORT that never listens, so `--port 0`
  becomes a real port, and no other program can take it while workers come and go;
- starts each worker as `python -m pdproxy.workers` (a fresh interpreter: nothing of the
  supervisor's event loop or sockets is inherited) and writes it its settings on stdin. stdin then
  stays open as a lifeline: a worker that reads EOF (the supervisor died, even by SIGKILL) drains
  and exits, so no worker outlives it. stdout carries one line back: `ready <control URL>` or
  `error <reason>`;
- restarts a worker that dies, after a delay that doubles with each quick failure in a row (1 s,
  2 s, 4 s ... at most 30 s; back to 1 s once a worker stayed up a minute), and on SIGTERM/SIGINT
  sends every worker SIGTERM: each drains exactly as a single process does;
- serves `/metrics` on `--metrics-port`, every worker's merged with a `worker` label plus its own
  `pdproxy_worker_up` and `pdproxy_worker_restarts_total`; each worker gets 2 s to answer, and one
  that does not (hung, restarting) is left out of that scrape with `pdproxy_worker_up` 0, so one
  worker never fails the whole scrape;
- serves the admin API on `--admin-port`, where each call goes to every worker.

A worker serves the OpenAI routes, /v1/models and /health on the shared port. Its own /metrics and
admin API are on a private control listener (127.0.0.1, a free port) that needs a token only this
supervisor knows. Every worker starts from the state file (given, or one in a private temporary
directory), and only worker 0 writes it: a restarted worker starts from the current membership.

Routing state is shared (pdproxy.routing): the supervisor creates one `SharedTable` (a file in
/dev/shm) and passes its path; each worker writes its row and reads everyone's, so caps, loads and
the prefix index are the host's. All workers get one PYTHONHASHSEED, so their prefix keys agree.
The supervisor clears a dead worker's row: its leases died with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import aiohttp
import orjson
from pydantic import SecretStr

from pdproxy.admin import MAX_ADMIN_BODY, authorize_request
from pdproxy.app import (
    ADMIN,
    FLOW,
    METRICS,
    App,
    Runner,
    admin_router,
    build_app,
    drain,
    run,
    start_server,
    wait_for_signal,
)
from pdproxy.errors import Forbidden, Unauthorized, Unavailable, UpstreamError
from pdproxy.gc_tuning import tune_for_serving
from pdproxy.http.limits import ServerLimits
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.http.router import Router
from pdproxy.membership import StateFileError
from pdproxy.metrics import CONTENT_TYPE, SupervisorMetrics, merge_expositions
from pdproxy.routing.share import share_routing
from pdproxy.routing.table import SharedTable
from pdproxy.settings import Settings

log = logging.getLogger("pdproxy.workers")

START_TIMEOUT = 60.0  # seconds a worker may take to report ready
STOP_GRACE = 5.0  # seconds on top of drain_timeout before the workers still running are killed
CONTROL_TIMEOUT = 10.0  # seconds for one call to a worker's control listener
SCRAPE_TIMEOUT = 2.0  # seconds one worker may take to answer a /metrics scrape (Prometheus' default is 10)
WORKER_COMMAND = (sys.executable, "-m", "pdproxy.workers")


@dataclass(slots=True, frozen=True)
class RestartBackoff:
    """How long to wait before starting a worker again: `base` × 2^(n-1) after the n-th quick failure
    in a row, at most `cap`; a worker that stayed up `reset_after` seconds starts from `base` again.

    A crash loop (a bad state file, no fds left) then costs a start every `cap` seconds, not every second."""

    base: float = 1.0
    cap: float = 30.0
    reset_after: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` (>= 1) quick failures in a row."""
        return min(self.cap, self.base * 2.0 ** min(max(failures - 1, 0), 64))

    def failures_after(self, failures: int, up_for: float) -> int:
        """The failure count once a worker that had failed `failures` times ended after `up_for` seconds."""
        return 1 if up_for >= self.reset_after else failures + 1


class WorkerStartError(Exception):
    """A worker could not start at start-up; the message says which and why."""


@dataclass(slots=True)
class Worker:
    """One worker slot: its current process and, while that serves, its control listener."""

    index: int
    process: asyncio.subprocess.Process | None = None
    control_url: str | None = None
    started_at: float = float("-inf")
    ready_at: float | None = None  # when the current process reported ready
    failures: int = 0  # quick failures in a row (see RestartBackoff)


class Answer(NamedTuple):
    """One worker's answer to a control call; `status` None when there was none (down, timed out)."""

    status: int | None
    body: bytes
    content_type: str = "application/json"


async def supervise(settings: Settings, setup_logging: Callable[[], None]) -> None:
    """Run `settings.workers` workers until SIGTERM/SIGINT, then drain them.

    `setup_logging` is called in each worker (it must pickle: a module-level function or a partial).
    """
    await Supervisor(settings, setup_logging).run()


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind host:port, never listening, with SO_REUSEPORT as the workers' sockets have it.

    A socket that does not listen gets no connections; it only holds the port for the workers."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise WorkerStartError("--workers needs SO_REUSEPORT, which this platform lacks")
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio's create_server does
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Starts, restarts and stops the workers; merges their /metrics; sends admin calls to each."""

    def __init__(self, settings: Settings, setup_logging: Callable[[], None], *,
                 command: Sequence[str] = WORKER_COMMAND, backoff: RestartBackoff | None = None,
                 scrape_timeout: float = SCRAPE_TIMEOUT) -> None:
        """`command` starts one worker process (tests give a small stand-in that speaks the same protocol)."""
        self.settings = settings
        self.setup_logging = setup_logging
        self.command = tuple(command)
        self.backoff = backoff or RestartBackoff()
        self.scrape_timeout = scrape_timeout
        self.metrics = SupervisorMetrics(settings.workers)
        self._stopped = asyncio.Event()  # wakes restart delays when the supervisor stops
        self.token = secrets.token_urlsafe(32)  # the workers' control listeners answer only this
        self.admin_token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
        self.workers = [Worker(index) for index in range(settings.workers)]
        self.stopping = False
        self.port = settings.port
        self.state_file = settings.state_file
        self.table: SharedTable | None = None
        self.hash_seed = os.environ.get("PYTHONHASHSEED") or str(secrets.randbelow(2**32 - 1) + 1)
        self._session: aiohttp.ClientSession | None = None

    async def run(self, until: Callable[[], Awaitable[None]] = wait_for_signal) -> None:
        """Serve until `until()` returns (SIGTERM or SIGINT by default), then stop the workers."""
        settings = self.settings
        reservation = reserve_port(settings.host, settings.port)
        self.port = reservation.getsockname()[1]
        temp_dir = None
        if settings.state_file is None:  # a private one, so a restarted worker starts from the current membership
            temp_dir = tempfile.mkdtemp(prefix="pdproxy-")
            self.state_file = Path(temp_dir) / "upstreams.json"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT))
        runners: list[Runner] = []
        self.table = SharedTable.create(len(self.workers))
        try:
            await self._listen(runners)
            errors = await asyncio.gather(*(self._start(worker) for worker in self.workers))
            failed = [f"worker {index}: {error}" for index, error in enumerate(errors) if error]
            if failed:
                raise WorkerStartError("; ".join(failed))
            log.info("pdproxy listening on http://%s:%s (%d workers; prefill: %s; decode: %s)",
                     settings.host, self.port, len(self.workers),
                     ", ".join(s.url for s in settings.prefill_servers),
                     ", ".join(s.url for s in settings.decode_servers))
            watchers = [asyncio.create_task(self._watch(worker)) for worker in self.workers]
            await until()
            await self._stop(watchers)
        finally:
            self.stopping = True
            self._stopped.set()
            self._signal(signal.SIGKILL)  # only on an error path is anything left by now
            for worker in self.workers:
                if worker.process is not None:
                    await worker.process.wait()
            for runner in runners:
                await runner.cleanup()
            await self._session.close()
            reservation.close()
            self.table.close()
            self.table.unlink()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
            log.info("pdproxy stopped")

    async def _listen(self, runners: list[Runner]) -> None:
        settings = self.settings
        assert settings.metrics_port is not None  # Settings requires it with workers > 1
        metrics = Router()
        metrics.add("GET", "/metrics", self._metrics)
        runner, url = await start_server(metrics, settings.host, settings.metrics_port)
        runners.append(runner)
        log.info("metrics of every worker on %s/metrics", url)
        if settings.admin_port is None:
            log.info("admin API off: with --workers it is served only on --admin-port")
            return
        admin = Router()
        for path in ("/admin/upstreams", "/admin/upstreams/{id}"):
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                admin.add(method, path, self._admin)
        runner, url = await start_server(admin, settings.admin_host, settings.admin_port,
                                         limits=ServerLimits(max_body_bytes=MAX_ADMIN_BODY))
        runners.append(runner)
        log.info("admin API on %s/admin/upstreams (each change goes to every worker)", url)

    # -- worker processes ------------------------------------------------------------------------

    async def _start(self, worker: Worker) -> str | None:
        """Start a process for `worker`; None once it serves, else why it did not."""
        worker.started_at = asyncio.get_running_loop().time()
        worker.control_url = None
        worker.ready_at = None
        settings = self.settings.model_copy(update={
            "port": self.port, "state_file": self.state_file,
            "admin_port": 0, "admin_token": SecretStr(self.token),  # admin off the main port, behind our token
        })
        assert self.table is not None
        process = worker.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, start_new_session=True,  # a terminal's Ctrl-C reaches only us
            env={**os.environ, "PYTHONHASHSEED": self.hash_seed},  # one string hash: prefix keys agree
        )
        if self.stopping:  # stopped while this process was being created: it was not signalled
            process.terminate()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(pickle.dumps((worker.index, settings, self.setup_logging, str(self.table.path))))
        with contextlib.suppress(ConnectionError):  # it died at once: its exit code tells
            await process.stdin.drain()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        except asyncio.TimeoutError:
            process.kill()
            return f"not ready after {START_TIMEOUT:g}s"
        kind, _, detail = line.decode(errors="replace").strip().partition(" ")
        if kind != "ready":
            return detail or f"exited with code {await process.wait()} before it was ready"
        worker.control_url = detail
        worker.ready_at = asyncio.get_running_loop().time()
        log.info("worker %d ready (pid %d)", worker.index, process.pid)
        return None

    async def _watch(self, worker: Worker) -> None:
        """Restart `worker` whenever its process ends, until the supervisor stops, waiting longer
        after each quick failure in a row (RestartBackoff)."""
        loop = asyncio.get_running_loop()
        while True:
            process = worker.process
            assert process is not None
            code = await process.wait()
            worker.control_url = None
            if self.table is not None:
                self.table.clear_row(worker.index)  # its leases ended with it; nobody else writes that row
            if process.stdin is not None:
                process.stdin.close()
            if self.stopping:
                return
            up_for = loop.time() - worker.ready_at if worker.ready_at is not None else 0.0
            worker.failures = self.backoff.failures_after(worker.failures, up_for)
            delay = self.backoff.delay(worker.failures)
            log.error("worker %d (pid %d) exited with code %s after %.1fs up: restarting in %gs (quick failures "
                      "in a row: %d)", worker.index, process.pid, code, up_for, delay, worker.failures)
            with contextlib.suppress(asyncio.TimeoutError):  # woken early only when the supervisor stops
                await asyncio.wait_for(self._stopped.wait(), delay)
            if self.stopping:
                return
            self.metrics.worker_restarts.labels(str(worker.index)).inc()
            try:
                error = await self._start(worker)
            except Exception as exc:  # e.g. out of processes or fds: never end this slot's restarts
                error = f"{type(exc).__name__}: {exc}"
                worker.ready_at = None
                if worker.process is not process and worker.process is not None \
                        and worker.process.returncode is None:
                    worker.process.kill()  # half started: its exit brings the next, backed-off, attempt
                # (with no new process, the next wait returns at once and backs off the same way)
            if error:
                log.error("worker %d did not start: %s", worker.index, error)

    async def _stop(self, watchers: list[asyncio.Task[None]]) -> None:
        """SIGTERM to every worker, which drains; a second signal, or the drain timeout, kills them."""
        self.stopping = True
        self._stopped.set()
        log.info("stopping: each worker drains its requests for up to %gs (a second signal stops at once)",
                 self.settings.drain_timeout)
        self._signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signal, signal.SIGKILL)
        try:
            _, pending = await asyncio.wait(watchers, timeout=self.settings.drain_timeout + STOP_GRACE)
            if pending:
                log.warning("%d workers still running after the drain timeout: killing them", len(pending))
                self._signal(signal.SIGKILL)
                await asyncio.wait(pending)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _signal(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    # -- control plane: merged /metrics, admin fan-out ---------------------------------------------

    async def _call(self, worker: Worker, method: str, path: str, body: bytes = b"",
                    content_type: str | None = None, timeout: float = CONTROL_TIMEOUT) -> Answer:
        """One call to a worker's control listener, bounded by `timeout` seconds."""
        if worker.control_url is None or self._session is None:
            return Answer(None, b"restarting")
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            async with self._session.request(method, worker.control_url + path, data=body or None,
                                             headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
                                             ) as response:
                return Answer(response.status, await response.read(), response.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Answer(None, (str(exc) or type(exc).__name__).encode())

    async def _everyone(self, method: str, path: str) -> list[Answer]:
        return list(await asyncio.gather(*(self._call(worker, method, path) for worker in self.workers)))

    async def _metrics(self, request: Request) -> Response:
        """Every worker's exposition that came within `scrape_timeout`, each sample labelled with its
        `worker`, then the supervisor's own metrics (`pdproxy_worker_up` says who answered)."""
        answers = await asyncio.gather(*(self._call(worker, "GET", "/metrics", timeout=self.scrape_timeout)
                                         for worker in self.workers))
        for index, answer in enumerate(answers):
            self.metrics.worker_up.labels(str(index)).set(1 if answer.status == 200 else 0)
        merged = merge_expositions(
            {str(index): a.body.decode(errors="replace") for index, a in enumerate(answers) if a.status == 200},
            "worker")
        return Response(body=merged.encode() + self.metrics.render(), content_type=CONTENT_TYPE)

    async def _admin(self, request: Request) -> Response:
        """The admin API of a single process, answered by all workers.

        A change is made only when every worker serves, and answered with worker 0's answer when
        every worker answered the same status; else 502 says what each one answered."""
        try:
            authorize_request(request, self.admin_token)
        except (Unauthorized, Forbidden) as exc:
            return exc.response()
        body = request.body
        upstream_id = request.match_info.get("id")
        if request.method == "GET" and upstream_id is None:
            return await self._list()
        restarting = [str(w.index) for w in self.workers if w.control_url is None]
        if restarting:
            return Unavailable(f"worker {', '.join(restarting)} is restarting: nothing was changed, try again",
                               retry_after=1).response()
        raw_path = request.path + (f"?{request.query_string}" if request.query_string else "")
        paths = [raw_path] * len(self.workers)
        if upstream_id is not None:
            paths = _local_paths(upstream_id, request.query_string, await self._everyone("GET", "/admin/upstreams"))
        answers = await asyncio.gather(*(
            self._call(worker, request.method, path, body, request.headers.get("content-type"))
            for worker, path in zip(self.workers, paths, strict=True)))
        first = answers[0]
        if first.status is not None and all(a.status == first.status for a in answers):
            return Response(status=first.status, body=first.body, content_type=first.content_type or "application/json")
        return _disagreement("the workers answered differently; their membership may now differ", answers)

    async def _list(self) -> Response:
        """The lowest serving worker's list, with `in_flight` and `served` summed over the workers."""
        answers = await self._everyone("GET", "/admin/upstreams")
        views = [view for view in map(_upstreams, answers) if view is not None]
        if not views:
            return _disagreement("no worker answered", answers)
        for upstream in views[0]:
            key = (upstream["role"], upstream["url"])
            for field in ("in_flight", "served"):
                upstream[field] = sum(u[field] for view in views for u in view if (u["role"], u["url"]) == key)
        return Response(body=orjson.dumps({"upstreams": views[0]}))


def _upstreams(answer: Answer) -> list[dict[str, Any]] | None:
    """The upstream list in a worker's answer to GET /admin/upstreams, if it gave one."""
    if answer.status != 200:
        return None
    try:
        upstreams: list[dict[str, Any]] = orjson.loads(answer.body)["upstreams"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return upstreams


def _local_paths(upstream_id: str, query: str, lists: list[Answer]) -> list[str]:
    """`/admin/upstreams/{id}` for each worker, with that worker's own id of the upstream.

    Ids are numbered per process, so a restarted worker may know an upstream by another id. The id
    the caller gives is the lowest serving worker's (GET shows that worker's list): find the
    (role, url) it names there, then the id each worker has for that (role, url)."""
    views = [_upstreams(answer) for answer in lists]
    base = next((view for view in views if view is not None), [])
    target = next(((u["role"], u["url"]) for u in base if u["id"] == upstream_id), None)
    paths = []
    for view in views:
        local = next((u["id"] for u in view or () if (u["role"], u["url"]) == target), upstream_id)
        paths.append(f"/admin/upstreams/{quote(local, safe='')}" + (f"?{query}" if query else ""))
    return paths


def _disagreement(what: str, answers: list[Answer]) -> Response:
    """502 in OpenAI's shape, with what each worker answered."""
    def said(answer: Answer) -> str:
        if answer.status is None:
            return f"no answer ({answer.body.decode(errors='replace')})"
        try:
            return f"{answer.status} {orjson.loads(answer.body)['error']['message']}"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return str(answer.status)

    detail = "; ".join(f"worker {index}: {said(answer)}" for index, answer in enumerate(answers))
    return UpstreamError(f"{what} ({detail})", side="internal", upstream="workers").response()


# -- the worker process ---------------------------------------------------------------------------


def worker_main() -> None:
    """A worker process: (index, settings, setup_logging, table path) come pickled on stdin from the supervisor."""
    index, settings, setup_logging, table_path = pickle.load(sys.stdin.buffer)
    setup_logging()
    for handler in logging.getLogger().handlers:  # text lines say which worker wrote them
        handler.addFilter(_WorkerName(index))
    try:
        app = build_app(settings, persist=index == 0)  # one writer of the state file
        if settings.shared_routing:
            share_routing(app, SharedTable.attach(table_path), index)
    except (StateFileError, ValueError, OSError) as exc:
        _report(f"error {exc}")
        sys.exit(2)
    run(_serve_worker(app, settings, index))


async def _serve_worker(app: App, settings: Settings, index: int) -> None:
    """Serve until SIGTERM or until the supervisor is gone, then drain as a single process does."""
    runners: list[Runner] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def supervisor_gone() -> None:  # stdin is readable only at EOF: the supervisor never writes again
        loop.remove_reader(sys.stdin.fileno())
        log.warning("worker %d: the supervisor is gone", index)
        stop.set()

    try:
        try:
            runner, _ = await start_server(app, settings.host, settings.port, reuse_port=True)
            runners.append(runner)
            runner, control_url = await start_server(_control_router(app), "127.0.0.1", 0,
                                                     limits=ServerLimits(max_body_bytes=MAX_ADMIN_BODY))
            runners.append(runner)
        except OSError as exc:
            _report(f"error {exc}")
            raise SystemExit(2) from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_reader(sys.stdin.fileno(), supervisor_gone)
        tune_for_serving()
        _report(f"ready {control_url}")
        await stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal stops at once
            loop.remove_signal_handler(sig)
        await drain(app[FLOW], settings.drain_timeout)
    finally:
        for runner in runners:
            await runner.cleanup()
        log.info("worker %d stopped", index)


def _control_router(app: App) -> Router:
    """This worker's admin API and /metrics, for the supervisor: both need its token."""
    admin, metrics = app[ADMIN], app[METRICS]
    control = admin_router(admin)

    async def scrape(request: Request) -> Response:
        try:
            admin.authorize(request)
        except (Unauthorized, Forbidden) as exc:
            return exc.response()
        return Response(body=metrics.render(), content_type=CONTENT_TYPE)

    control.add("GET", "/metrics", scrape)
    return control


class _WorkerName(logging.Filter):
    """`pdproxy.flow` -> `pdproxy.flow[worker 1]` in the lines of the root logger's handlers."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[worker {index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):  # one record passes the filter of every root handler
            record.name += self.suffix
        return True


def _report(line: str) -> None:
    """Tell the supervisor one line on stdout; then stdout becomes stderr, so nothing else reaches it."""
    sys.stdout.write(" ".join(line.split()) + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    worker_main()
