"""`GET /v1/models` over several models: the union of what each model's servers list, deduplicated by id.

One model: one server's own answer, byte for byte, as before. Several: one server of each distinct set of names
(`ModelTable.listing`) is asked at once and the `data` lists are merged, first listing of an id kept (its
`max_model_len`, `root`, `parent` as that engine tells them). A set whose servers cannot answer is left out;
when none answers, the first failure is the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from pdproxy.http.response import Response
from pdproxy.proxy.passthrough import Passthrough
from pdproxy.served_models import ModelTable
from pdproxy.upstreams import UpstreamPool


class ModelList:
    """Stands where the `/v1/models` pass-through stood (same `forward`)."""

    def __init__(self, table: ModelTable, single: Passthrough, per_pool: Callable[[UpstreamPool], Passthrough]) -> None:
        self.table = table
        self.single = single
        self._per_pool = per_pool  # a pass-through to one pool of `table.listing`

    async def forward(self, method: str, path: str, headers: bytes, request_id: str, body: bytes = b"") -> Response:
        listing = self.table.listing
        if self.table.single is not None or not listing:
            return await self.single.forward(method, path, headers, request_id, body)
        answers = await asyncio.gather(*(self._per_pool(pool).forward(method, path, headers, request_id, body)
                                         for pool in listing), return_exceptions=True)
        entries: dict[str, object] = {}
        first_failure: Response | BaseException | None = None
        for answer in answers:
            data = _entries(answer) if isinstance(answer, Response) and answer.status == 200 else None
            if data is None:
                first_failure = first_failure or answer
                continue
            for entry in data:
                entries.setdefault(entry["id"], entry)
        if not entries and first_failure is not None:
            if isinstance(first_failure, Response):
                return first_failure
            raise first_failure  # a ProxyError (api renders it); anything else is a bug for the server's boundary
        return Response(status=200, body=orjson.dumps({"object": "list", "data": list(entries.values())}),
                        content_type="application/json", headers=(("X-Request-Id", request_id),))


def _entries(response: Response) -> list[dict[str, object]] | None:
    try:
        answer = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        return None
    return [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
