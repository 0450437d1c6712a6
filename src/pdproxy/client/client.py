"""UpstreamClient: pdproxy's HTTP/1.1 client for P and D calls (keep-alive pools, deadlines, stale re-send)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from .errors import CallError, ClientClosed, ConnectionLost
from .exchange import _FIRST_BYTE, _TOTAL, Exchange
from .messages import Response, Stream
from .options import ClientOptions
from .pool import UpstreamPool

_CLOSE_WAIT = 1.0  # close() waits at most this long for the transports to report connection_lost


def _is_stale(error: CallError) -> bool:
    """A reused connection that failed before any response byte: the server closed it while idle."""
    return isinstance(error, ConnectionLost) and error.reused and not error.got_response_bytes


class UpstreamClient:
    """Pooled keep-alive HTTP/1.1 calls to many upstreams, on asyncio protocols and httptools.

    One instance per event loop (the first call binds it). No task is created per call or per chunk: a call
    is one future, one timer handle and one exchange object.
    """

    __slots__ = ("_closed", "_loop", "_on_stale_retry", "_options", "_pools", "_ssl", "_time", "_time_override")

    def __init__(
        self,
        options: ClientOptions,
        *,
        on_stale_retry: Callable[[str], None] | None = None,
        loop_time: Callable[[], float] | None = None,
    ) -> None:
        """`on_stale_retry(base_url)` is called each time a stale keep-alive failure is re-sent; `loop_time`
        replaces the loop clock for deadlines and last_activity (tests)."""
        self._options = options
        self._on_stale_retry = on_stale_retry
        self._time_override = loop_time
        self._time: Callable[[], float] | None = loop_time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[str, UpstreamPool] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def _pool(self, base_url: str) -> UpstreamPool:
        pool = self._pools.get(base_url)
        if pool is not None:
            return pool
        if self._closed:
            raise ClientClosed(f"{base_url}: client is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            if self._time is None:
                self._time = loop.time
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL {base_url!r} (want http://host:port or https://host:port)")
        context = None
        if parts.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        port = parts.port or (443 if context is not None else 80)
        pool = UpstreamPool(base_url, parts.hostname, port, context, self._options, loop)
        self._pools[base_url] = pool
        return pool

    async def _exchange(
        self, base_url: str, method: str, path: str, headers: bytes, body: bytes, *, streaming: bool,
        timeout: float, max_bytes: int, idle_timeout: float = 0.0,
    ) -> Response | Stream:
        """Send once; on a stale keep-alive failure send once more on a fresh connection."""
        pool = self._pool(base_url)
        head = pool.request_head(method, path, headers, body)
        head_only = method == "HEAD"
        kind = _FIRST_BYTE if streaming else _TOTAL
        loop = pool.loop
        time = self._time
        assert time is not None
        fresh = False
        while True:
            if self._closed:
                raise ClientClosed(f"{base_url}: client is closed")
            conn = await pool.acquire(fresh, time)
            exchange = Exchange(
                conn, streaming=streaming, head_only=head_only, max_bytes=max_bytes,
                max_header_bytes=self._options.max_header_bytes, loop=loop, time=time,
                idle_timeout=idle_timeout,
            )
            future = exchange.future
            assert future is not None
            exchange.send(head, body, timeout, kind)
            try:
                return await future
            except CallError as error:
                if fresh or not _is_stale(error):
                    raise
                fresh = True  # the one re-send, never from the pool
                if self._on_stale_retry is not None:
                    self._on_stale_retry(base_url)
            except asyncio.CancelledError:
                # The caller is gone: the socket closes (never pooled). A stream handed over just as the
                # cancel landed is aborted too.
                if future.done() and not future.cancelled() and future.exception() is None:
                    result = future.result()
                    if isinstance(result, Stream):
                        result.abort()
                exchange.abort()
                raise

    async def fetch(
        self, base_url: str, method: str, path: str, *, headers: bytes = b"", body: bytes = b"",
        timeout: float, max_bytes: int | None = None,
    ) -> Response:
        """Whole response. `timeout` bounds everything after the connection is had (send, first byte, body)."""
        limit = self._options.max_response_bytes if max_bytes is None else max_bytes
        result = await self._exchange(
            base_url, method, path, headers, body, streaming=False, timeout=timeout, max_bytes=limit
        )
        assert isinstance(result, Response)
        return result

    async def open(
        self, base_url: str, method: str, path: str, *, headers: bytes = b"", body: bytes = b"",
        first_byte_timeout: float, idle_timeout: float,
    ) -> Stream:
        """Returns once the response head AND the first body bytes (or the end of the message) arrived, within
        first_byte_timeout; the rest of the body flows to a sink given to Stream.start()."""
        result = await self._exchange(
            base_url, method, path, headers, body, streaming=True, timeout=first_byte_timeout,
            max_bytes=self._options.max_response_bytes, idle_timeout=idle_timeout,
        )
        assert isinstance(result, Stream)
        return result

    def stats(self) -> dict[str, tuple[int, int]]:
        """base_url -> (open connections, idle connections)."""
        return {url: (pool.open, len(pool.idle)) for url, pool in self._pools.items()}

    async def close(self) -> None:
        """Close every connection (in-flight calls fail with ClientClosed); later calls raise ClientClosed."""
        self._closed = True
        waits = [w for w in (pool.close() for pool in self._pools.values()) if w is not None]
        if waits:
            await asyncio.wait(waits, timeout=_CLOSE_WAIT)
