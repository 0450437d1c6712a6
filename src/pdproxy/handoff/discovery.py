"""Per-upstream handoff metadata: fetched next to the health probe, kept on `Upstream.meta`.

An upstream whose role needs metadata starts unroutable (`prepare`) and becomes routable after
its first good discovery; a later failure makes it unroutable again with the reason in
`Upstream.meta_error` (shown by `/health?verbose=1` and the admin listing), and a change (a P
restarted with new engine ids) replaces `meta` in one assignment, so a plan reads either the old
or the new view, never half of each. Discovery runs only while the upstream's health probe passes:
a dead server has nothing to tell, and health already keeps it out of routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from pdproxy.client import CallError, UpstreamClient
from pdproxy.handoff.base import FetchJson, Handoff, MetadataError
from pdproxy.upstreams import Upstream

log = logging.getLogger("pdproxy.handoff")

PENDING = "handoff metadata not discovered yet"

Probe = Callable[[Upstream], Awaitable["str | None"]]  # as health.Probe: None healthy, else why not


async def fetch_meta(fetch_json: FetchJson, url: str) -> Any:
    """GET `url` through the injected client; any failure of that client becomes a MetadataError
    (this is the one boundary where the client's own exception types are translated)."""
    try:
        return await fetch_json(url)
    except MetadataError:
        raise
    except Exception as exc:  # the client is injected: its error types are not ours to know
        raise MetadataError(f"GET {url} failed: {str(exc) or type(exc).__name__}") from None


def overrides_for(overrides: Mapping[str, Mapping[str, Any]], upstream: Upstream) -> dict[str, Any]:
    """The operator's fixed metadata for this upstream (keyed by its normalised URL)."""
    return dict(overrides.get(upstream.url, {}))


class MetadataRefresher:
    """Runs a handoff's `discover()` for the upstreams that need it and applies the result."""

    __slots__ = ("_fetch_json", "_handoff", "_on_change")

    def __init__(
        self, handoff: Handoff, fetch_json: FetchJson, on_change: Callable[[Upstream], None] | None = None
    ) -> None:
        self._handoff = handoff
        self._fetch_json = fetch_json
        self._on_change = on_change  # e.g. StateBoard.notify: waiters for a routable upstream re-check

    def needs(self, upstream: Upstream) -> bool:
        return upstream.role in self._handoff.meta_roles

    def prepare(self, upstream: Upstream) -> None:
        """Call when an upstream joins a pool: it stays unroutable until its metadata is known."""
        if self.needs(upstream) and not upstream.meta:
            upstream.meta_error = PENDING

    async def refresh(self, upstream: Upstream) -> bool:
        """Discover once and apply; True when `meta` or `meta_error` changed."""
        if not self.needs(upstream):
            return False
        try:
            meta, error = await self._handoff.discover(upstream, self._fetch_json), None
        except MetadataError as exc:
            meta, error = upstream.meta, str(exc) or "metadata discovery failed"  # last good view kept for display
        if meta == upstream.meta and error == upstream.meta_error:
            return False
        if error is None:
            log.info("%s upstream %s: handoff metadata %s", upstream.role.value, upstream.url,
                     orjson.dumps(meta).decode())
        else:
            log.warning("%s upstream %s: not routable: %s", upstream.role.value, upstream.url, error)
        upstream.meta = meta  # one assignment: a plan sees the old or the new dict, never a mix
        upstream.meta_error = error
        if self._on_change is not None:
            self._on_change(upstream)
        return True

    def wrap(self, health_probe: Probe) -> Probe:
        """The health probe followed, when it passes, by discovery: one probe for the health checker."""

        async def probe(upstream: Upstream) -> str | None:
            error = await health_probe(upstream)
            if error is None:
                await self.refresh(upstream)
            return error

        return probe


class MetadataWithoutHealth:
    """Discovery when active health checks are off (`--health-interval 0`): each upstream that needs
    metadata is refreshed once when it joins (at start-up or added later), and again every
    `retry_interval` seconds only while it has none, so a P that was not up yet becomes routable
    once it is. An App service: `start()` with the app, `stop()` cancels what still runs."""

    __slots__ = ("_pending", "_refresher", "_retry_interval", "_started", "_tasks")

    def __init__(self, refresher: MetadataRefresher, *, retry_interval: float = 5.0) -> None:
        self._refresher = refresher
        self._retry_interval = retry_interval
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pending: list[Upstream] = []  # joined before start(): no loop to run on yet
        self._started = False

    def watch(self, upstream: Upstream) -> None:
        """An upstream joined: mark it pending and discover its metadata (at once, or at start)."""
        self._refresher.prepare(upstream)
        if not self._refresher.needs(upstream):
            return
        if not self._started:
            self._pending.append(upstream)
        elif upstream.id not in self._tasks:
            self._tasks[upstream.id] = asyncio.create_task(self._run(upstream), name=f"handoff meta {upstream.url}")

    def unwatch(self, upstream: Upstream) -> None:
        task = self._tasks.pop(upstream.id, None)
        if task is not None:
            task.cancel()

    def start(self) -> None:
        self._started = True
        pending, self._pending = self._pending, []
        for upstream in pending:
            self.watch(upstream)

    async def stop(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, upstream: Upstream) -> None:
        try:
            while True:
                try:
                    await self._refresher.refresh(upstream)
                except Exception:  # a bug must not leave the upstream pending for ever unlogged
                    log.exception("handoff metadata discovery of %s raised", upstream.url)
                if upstream.meta_error is None:
                    return
                await asyncio.sleep(self._retry_interval)
        finally:
            if self._tasks.get(upstream.id) is asyncio.current_task():
                del self._tasks[upstream.id]


def _parse_json(url: str, status: int, body: bytes) -> Any:
    if not 200 <= status < 300:
        raise MetadataError(f"GET {url} answered {status}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MetadataError(f"GET {url} answered a body that is not JSON") from None


def client_fetch_json(client: UpstreamClient, timeout: float) -> FetchJson:
    """A `fetch_json` on pdproxy's own upstream client (keep-alive pools; `timeout` bounds the answer,
    the client's connect_timeout the connection). Bootstrap servers get their own pool, by base URL."""

    async def fetch_json(url: str) -> Any:
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            resp = await client.fetch(base, "GET", path, headers=b"Accept: application/json\r\n", timeout=timeout)
        except CallError as exc:
            raise MetadataError(f"GET {url} failed: {exc}") from None
        return _parse_json(url, resp.status, resp.body)

    return fetch_json


