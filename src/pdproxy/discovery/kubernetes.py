"""`kubernetes` discovery: EndpointSlices by label selector, list then watch, over plain HTTP (aiohttp).

The informer pattern without a client library: LIST the slices (which gives a resourceVersion), then
WATCH from that version (`allowWatchBookmarks`, a server-side `timeoutSeconds`), re-WATCH from the last
version seen when the stream ends, and LIST again when the server says the version is too old (410).

Each endpoint's conditions (discovery.k8s.io/v1; an absent condition reads as the API documents it:
`ready` and `serving` true, `terminating` false). An endpoint is routable only when all three agree:
- `ready` false: a pod failing its readiness probe, or terminating (the controller's usual case);
- `serving` false: the pod's own Ready condition is false. This is the one that counts when the Service
  sets `publishNotReadyAddresses`, where `ready` is true for every pod, ready or not;
- `terminating` true: the pod is being deleted; never a new request, even when `ready` says true.
Not routable: kept listed but drained, so no new request goes there while requests already on it run to
their end (a terminating pod that is still `serving` finishes its streams; pdproxy never cuts them).
Gone from every slice: removed after the reconciler's removal delay.

Needs `get`, `list` and `watch` on `endpointslices` in group `discovery.k8s.io` (config/kubernetes/rbac.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from pdproxy.discovery.base import SourceFailure, Target, Update, merge_targets
from pdproxy.upstreams import Role, normalize_url

log = logging.getLogger("pdproxy.discovery")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_SECONDS = 290  # server-side end of each watch; a new one starts from the last resourceVersion
MAX_BACKOFF = 30.0


class KubernetesError(Exception):
    """The API server refused or sent something that is not an EndpointSlice list or event."""


class Expired(KubernetesError):
    """410 Gone: the resourceVersion is too old to watch from; list again."""


def in_cluster_api_url() -> str | None:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def default_namespace() -> str:
    try:
        return (SERVICE_ACCOUNT / "namespace").read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


def routable(conditions: Mapping[str, Any]) -> bool:
    """Ready, serving and not terminating; nil reads as the API documents it (true, true, false)."""
    return (conditions.get("ready") is not False and conditions.get("serving") is not False
            and conditions.get("terminating") is not True)


def slice_targets(item: Mapping[str, Any], port: str, scheme: str) -> list[Target]:
    """The upstreams of one EndpointSlice; KubernetesError when it has no usable port."""
    name = item.get("metadata", {}).get("name", "?")
    ports = item.get("ports") or []
    chosen = [p for p in ports if port and (p.get("name") == port or str(p.get("port")) == port)] if port \
        else ports
    if len(chosen) != 1 or not isinstance(chosen[0].get("port"), int):
        wanted = f"a port named or numbered {port!r}" if port else "exactly one port (set discovery_k8s_port)"
        raise KubernetesError(f"EndpointSlice {name} has no {wanted}")
    number = chosen[0]["port"]
    targets = []
    for endpoint in item.get("endpoints") or []:
        ready = routable(endpoint.get("conditions") or {})
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            targets.append(Target(normalize_url(f"{scheme}://{host}:{number}"), 1, ready))
    return targets


class KubernetesSource:
    """Watches the EndpointSlices of each role's selector; yields a role's list whenever its slices change."""

    name = "kubernetes"

    def __init__(self, selectors: Mapping[Role, str], *, api_url: str, namespace: str, port: str = "",
                 scheme: str = "http", token_file: Path | None = None, ca_file: Path | None = None,
                 request_timeout: float = 10.0, watch_seconds: int = WATCH_SECONDS,
                 backoff: float = 1.0) -> None:
        self.selectors = {role: selector for role, selector in selectors.items() if selector.strip()}
        self.api_url = api_url.rstrip("/")
        self.namespace = namespace
        self.port = port
        self.scheme = scheme
        self.token_file = token_file
        self.ca_file = ca_file
        self.request_timeout = request_timeout
        self.watch_seconds = watch_seconds
        self.backoff = backoff

    @property
    def path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"

    async def updates(self) -> AsyncIterator[Update]:
        queue: asyncio.Queue[Update] = asyncio.Queue()
        connector = aiohttp.TCPConnector(ssl=self._ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.ensure_future(self._follow(session, role, selector, queue))
                     for role, selector in self.selectors.items()]
            try:
                while True:
                    yield await queue.get()
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not self.api_url.startswith("https:"):
            return False
        context = ssl.create_default_context()
        if self.ca_file is not None and self.ca_file.exists():
            context.load_verify_locations(cafile=str(self.ca_file))
        return context

    def _headers(self) -> dict[str, str]:
        """The token is read at each connection: projected service account tokens rotate."""
        headers = {"Accept": "application/json"}
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError:
                token = ""
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _follow(self, session: aiohttp.ClientSession, role: Role, selector: str,
                      queue: asyncio.Queue[Update]) -> None:
        """List, then watch, forever; every change of the role's slices puts its whole list on the queue."""
        slices: dict[str, Mapping[str, Any]] = {}
        version: str | None = None
        backoff = self.backoff
        while True:
            try:
                if version is None:
                    slices, version = await self._list(session, selector)
                await queue.put({role: self._targets(slices)})  # fresh from a list, or still true on a re-watch
                async for kind, item in self._watch(session, selector, version):
                    version = item.get("metadata", {}).get("resourceVersion") or version
                    if kind == "BOOKMARK":  # nothing changed: the list is still good (keeps its age fresh)
                        await queue.put({role: self._targets(slices)})
                        continue
                    name = item.get("metadata", {}).get("name", "")
                    if kind == "DELETED":
                        slices.pop(name, None)
                    else:  # ADDED, MODIFIED
                        slices[name] = item
                    await queue.put({role: self._targets(slices)})
                backoff = self.backoff  # a watch that ran to its end: watch again from `version`
            except Expired:
                log.info("kubernetes: resourceVersion %s expired for %s, listing again", version, selector)
                version = None
            except (aiohttp.ClientError, asyncio.TimeoutError, KubernetesError, ValueError) as exc:
                await queue.put(SourceFailure(f"EndpointSlices {selector!r}: {exc or type(exc).__name__}"))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _targets(self, slices: Mapping[str, Mapping[str, Any]]) -> tuple[Target, ...]:
        found: list[Target] = []
        for item in slices.values():
            try:
                found.extend(slice_targets(item, self.port, self.scheme))
            except KubernetesError as exc:
                log.warning("kubernetes: %s: skipped", exc)
        return merge_targets(found)

    async def _list(self, session: aiohttp.ClientSession,
                    selector: str) -> tuple[dict[str, Mapping[str, Any]], str]:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with session.get(self.api_url + self.path, params={"labelSelector": selector},
                               headers=self._headers(), timeout=timeout) as response:
            await _check(response)
            data = await response.json(content_type=None)
        if not isinstance(data, dict) or not isinstance(data.get("items", []), list):
            raise KubernetesError("the list answer is not an EndpointSliceList")
        items = {item["metadata"]["name"]: item for item in data.get("items") or []}
        return items, str(data.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, session: aiohttp.ClientSession, selector: str,
                     version: str) -> AsyncIterator[tuple[str, Mapping[str, Any]]]:
        params = {"labelSelector": selector, "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(self.watch_seconds)}
        # The server ends the watch after watch_seconds and sends bookmarks meanwhile; a stream silent
        # for much longer than that is dead, so each read is bounded.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.request_timeout,
                                        sock_read=self.watch_seconds + self.request_timeout)
        async with session.get(self.api_url + self.path, params=params, headers=self._headers(),
                               timeout=timeout) as response:
            await _check(response)
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if item.get("code") == 410:
                        raise Expired(item.get("message", "410 Gone"))
                    raise KubernetesError(f"watch error {item.get('code')}: {item.get('message')}")
                if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                    raise KubernetesError(f"unknown watch event type {kind!r}")
                yield kind, item


async def _check(response: aiohttp.ClientResponse) -> None:
    if response.status == 410:
        raise Expired("410 Gone")
    if response.status != 200:
        body = (await response.text())[:200]
        raise KubernetesError(f"{response.method} {response.url.path} answered {response.status}: {body}")
