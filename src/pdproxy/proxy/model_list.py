"""`GET /v1/models` over several models: the union of what each model's servers list, deduplicated by id.

One model: the ordinary pass-through (one server's own answer, byte for byte), so nothing here runs. Several:
one routable server of each distinct set of names (`ModelTable.listing`, least loaded first) is asked at once
and the `data` lists are merged, the first listing of an id kept (its `max_model_len`, `root`, `parent` as that
engine tells them). A set whose servers cannot answer is left out; when none answers, the first failure is the
answer (an upstream's own 4xx unchanged, e.g. a 401 for a missing `--upstream-api-key`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from pdproxy.client import CallError, UpstreamClient
from pdproxy.errors import Unavailable
from pdproxy.http.response import Response
from pdproxy.model_discovery import model_entries
from pdproxy.proxy.calls import check_status, translate
from pdproxy.served_models import ModelTable
from pdproxy.upstreams import Lease, Upstream, UpstreamPool

MODELS_PATH = "/v1/models"


class ModelList:
    """The union of `/v1/models` answers, for a proxy that serves several models."""

    def __init__(self, table: ModelTable, client: UpstreamClient, *, timeout: float, max_answer_bytes: int,
                 on_release: Callable[[Upstream], None]) -> None:
        self.table = table
        self.client = client
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self._on_release = on_release

    @property
    def active(self) -> bool:
        """Whether `/v1/models` needs the union (several models), rather than the plain pass-through."""
        return self.table.single is None and bool(self.table.listing)

    async def union(self, headers: bytes, request_id: str) -> Response:
        answers = await asyncio.gather(*(self._ask(pool, headers) for pool in self.table.listing),
                                       return_exceptions=True)
        entries: dict[str, dict[str, object]] = {}
        first_failure: Response | BaseException | None = None
        for answer in answers:
            data = model_entries(answer.body) if isinstance(answer, Response) and answer.status == 200 else None
            if data is None:
                first_failure = first_failure or answer
                continue
            for entry in data:
                entries.setdefault(str(entry["id"]), entry)
        if not entries and first_failure is not None:
            if isinstance(first_failure, Response):
                return first_failure
            raise first_failure  # a ProxyError (rendered by the caller); anything else is a bug
        return Response(status=200, body=orjson.dumps({"object": "list", "data": list(entries.values())}),
                        content_type="application/json", headers=(("X-Request-Id", request_id),))

    async def _ask(self, pool: UpstreamPool, headers: bytes) -> Response:
        """One routable member's whole answer; its 4xx as it is, anything worse as a ProxyError."""
        side = pool.role.value
        candidates = pool.routable()
        if not candidates:
            raise Unavailable(f"no routable {side} upstream", side=side)
        upstream = min(candidates, key=lambda u: u.load)
        lease = Lease(upstream, self._on_release)
        try:
            resp = await self.client.fetch(upstream.url, "GET", MODELS_PATH, headers=headers, timeout=self.timeout,
                                           max_bytes=self.max_answer_bytes)
        except CallError as exc:
            raise translate(exc, side=side, upstream=upstream.url, stage="models", timeout=self.timeout) from None
        finally:
            lease.release()
        content_type = resp.headers.get("content-type", "application/json")
        if resp.status >= 300 and not 400 <= resp.status < 500:
            check_status(resp.status, content_type, resp.body, side=side, upstream=upstream.url)
        return Response(status=resp.status, body=resp.body, content_type=content_type)

