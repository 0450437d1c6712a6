"""The keep-alive pool of one upstream (one base_url): idle connections (LIFO), the cap, connecting."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from collections import deque
from collections.abc import Callable

from .connection import Connection
from .errors import ClientClosed, ConnectFailed, ConnectTimeout
from .options import ClientOptions

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as _timeout

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class UpstreamPool:
    """Connections to one upstream. `open` counts established connections (busy + idle) not yet closed.

    Invariants: a connection is in `idle` only while it has no exchange and its idle timer is armed; `forget`
    is the one place a connection stops being counted, and it wakes one waiter for the freed slot.
    """

    __slots__ = (
        "all_lost", "base_url", "closed", "closing", "connecting", "conns", "host", "host_line", "idle", "loop",
        "options", "port", "server_hostname", "ssl", "waiters",
    )

    def __init__(
        self,
        base_url: str,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        options: ClientOptions,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.base_url = base_url
        self.host = host
        self.port = port
        self.ssl = ssl_context
        self.server_hostname = host if ssl_context is not None else None
        authority = f"[{host}]" if ":" in host else host
        self.host_line = f"Host: {authority}:{port}\r\n".encode("latin-1")
        self.options = options
        self.loop = loop
        self.idle: dict[Connection, None] = {}  # insertion order: last = freshest (LIFO reuse via popitem)
        self.conns: set[Connection] = set()  # every counted connection, busy or idle
        self.connecting = 0
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.closed = False
        self.closing: set[Connection] = set()  # connections close() is waiting to see lost
        self.all_lost: asyncio.Future[None] | None = None

    @property
    def open(self) -> int:
        return len(self.conns)

    # ---- requests ----
    def request_head(self, method: str, path: str, headers: bytes, body: bytes) -> bytes:
        """The request line, Host, the caller's prebuilt header lines, Content-Length and the blank line."""
        if " " in path or "\r" in path or "\n" in path:
            raise ValueError(f"invalid request target {path!r}")
        if body or method in _BODY_METHODS:
            length = b"Content-Length: %d\r\n" % len(body)
        else:
            length = b""
        return b"%s %s HTTP/1.1\r\n%s%s%s\r\n" % (
            method.encode("ascii"), path.encode("latin-1"), self.host_line, headers, length
        )

    # ---- acquiring ----
    def pop_idle(self) -> Connection | None:
        """The freshest idle connection that is still open, its idle timer cancelled."""
        idle = self.idle
        while idle:
            conn, _ = idle.popitem()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if conn.transport is None or conn.transport.is_closing():
                conn.discard()
                continue
            return conn
        return None

    async def acquire(self, fresh: bool, time: Callable[[], float]) -> Connection:
        """An idle connection (unless `fresh`), else a new one; under the cap waits, all within connect_timeout."""
        if not fresh:
            conn = self.pop_idle()
            if conn is not None:
                return conn
        cap = self.options.max_connections
        budget = self.options.connect_timeout
        if not cap or (len(self.conns) + self.connecting < cap and not self.waiters):
            return await self.connect(budget)
        deadline = time() + budget
        while True:
            await self._wait_for_slot(deadline - time(), cap)
            if not fresh:
                conn = self.pop_idle()
                if conn is not None:
                    return conn
            if len(self.conns) + self.connecting < cap:
                return await self.connect(max(deadline - time(), 0.0))

    async def _wait_for_slot(self, left: float, cap: int) -> None:
        """Wait until a connection frees (released idle, closed, or a connect gave up), at most `left` s."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self.waiters.append(waiter)
        handle = self.loop.call_later(max(left, 0.0), _expire_waiter, waiter)
        try:
            woken = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.wake()  # we were handed a slot but will not use it: pass it on
            raise
        finally:
            handle.cancel()
            if waiter in self.waiters:  # expired or cancelled: a stale entry would make newcomers queue
                self.waiters.remove(waiter)
        if self.closed:
            raise ClientClosed(f"{self.base_url}: client closed while waiting for a connection")
        if not woken:
            raise ConnectTimeout(
                f"{self.base_url}: no free connection within {self.options.connect_timeout:g} s "
                f"(max_connections={cap})"
            )

    def wake(self) -> None:
        """Tell the longest waiter a slot may be free (it re-checks)."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return

    async def connect(self, budget: float) -> Connection:
        """A new connection within `budget` seconds; OS errors become ConnectFailed, the deadline ConnectTimeout."""
        self.connecting += 1
        try:
            async with _timeout(budget):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.server_hostname,
                )
        except BaseException as exc:
            self.connecting -= 1
            if self.waiters:
                self.wake()  # the connect slot this call held is free again
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                raise ConnectTimeout(f"{self.base_url}: connect did not complete within {budget:g} s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(f"{self.base_url}: connect failed: {_reason(exc)}") from None
            raise
        self.connecting -= 1
        if self.closed:
            conn.discard()
            raise ClientClosed(f"{self.base_url}: client closed during connect")
        self.conns.add(conn)
        return conn

    # ---- returning and forgetting ----
    def release(self, conn: Connection, keep_alive: bool) -> None:
        """A complete message: pool the connection if it may be reused, else close it."""
        conn.served += 1
        if conn.closed:
            return
        if not keep_alive or self.closed:
            conn.discard()
            return
        idle = self.idle
        if len(idle) >= self.options.max_idle:
            if not idle:
                conn.discard()
                return
            next(iter(idle)).discard()  # the stalest goes; LIFO keeps the freshest
        idle[conn] = None
        conn.idle_handle = self.loop.call_later(self.options.keepalive_timeout, conn.expire)
        if self.waiters:
            self.wake()

    def forget(self, conn: Connection) -> None:
        """Stop counting a connection that is closing or closed; idempotent."""
        if conn.closed:
            return
        conn.closed = True
        if conn.idle_handle is not None:
            conn.idle_handle.cancel()
            conn.idle_handle = None
        self.idle.pop(conn, None)
        self.conns.discard(conn)
        if self.waiters:
            self.wake()

    def connection_lost(self, conn: Connection) -> None:
        self.forget(conn)
        closing = self.closing
        if closing:
            closing.discard(conn)
            if not closing and self.all_lost is not None and not self.all_lost.done():
                self.all_lost.set_result(None)

    # ---- closing ----
    def close(self) -> asyncio.Future[None] | None:
        """Fail waiters and in-flight calls with ClientClosed and close every connection.

        Returns a future that resolves once every closed transport reported connection_lost (None if none).
        """
        self.closed = True
        self.closing = set(self.conns)
        if self.closing:
            self.all_lost = self.loop.create_future()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # re-checks `closed` and raises ClientClosed
        for conn in list(self.conns):
            exchange = conn.exchange
            if exchange is not None:
                exchange.close_for_client()
            else:
                conn.discard()
        return self.all_lost


def _reason(exc: OSError) -> str:
    """The OS error in words ("Connection refused"); asyncio's own text only says the call failed."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return str(exc)
    return os.strerror(exc.errno)


def _expire_waiter(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
