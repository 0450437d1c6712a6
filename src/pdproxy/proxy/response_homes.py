"""Where each Responses-API answer lives: `GET /v1/responses/{id}` and `.../cancel` must reach the server
that created it (vLLM keeps its response store in that process's memory).

The id is remembered, not encoded: the engine's id appears in every streamed event and in the stored
object, so encoding the upstream into it would mean rewriting every event (a parse per chunk), and a
client that talks to the engine directly would hold ids the engine does not know. The memory is a bounded
LRU per worker process; an id it does not know (another worker, a restart, evicted) is asked around the
pool (see `http.api`), so a miss costs a few GETs, never a wrong answer.
"""

from __future__ import annotations

import re
from collections import OrderedDict

# The answer's own id: the first `"id":"resp_..."` in a response object, or in a stream's first event
# (`response.created` carries the response object).
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_.-]{1,200})"')
SEARCHED_BYTES = 4096  # the id is near the start: never scan a long answer
DEFAULT_CAPACITY = 65536


class ResponseHomes:
    """Response id -> URL of the upstream that created it, least recently used first out."""

    __slots__ = ("_capacity", "_homes")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._homes: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def learn(self, upstream_url: str, answer_start: bytes) -> str | None:
        """Remember the id found at the start of an answer from `upstream_url`; the id, or None."""
        match = _RESPONSE_ID.search(answer_start, 0, SEARCHED_BYTES)
        if match is None:
            return None
        response_id = match.group(1).decode()
        self.remember(response_id, upstream_url)
        return response_id

    def remember(self, response_id: str, upstream_url: str) -> None:
        homes = self._homes
        homes[response_id] = upstream_url
        homes.move_to_end(response_id)
        while len(homes) > self._capacity:
            homes.popitem(last=False)

    def home(self, response_id: str) -> str | None:
        url = self._homes.get(response_id)
        if url is not None:
            self._homes.move_to_end(response_id)
        return url
