"""The routes the proxy serves by passing them through (no imports: settings validate against this table)."""

from __future__ import annotations

RESPONSES = "/v1/responses"
RESPONSE_BY_ID = "/v1/responses/{response_id}"
RESPONSE_CANCEL = "/v1/responses/{response_id}/cancel"
#: Routes passed through byte for byte (method, path); `route_pools` may send each to the prefill pool.
#: `/v1/responses` also decides where its GET and cancel by id go (to the server that created the answer).
PASSTHROUGH_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/v1/models"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/rerank"),
    ("POST", "/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/v1/score"),
    ("POST", "/score"),
    ("POST", "/pooling"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/messages"),
    ("POST", RESPONSES),
)
PASSTHROUGH_PATHS = frozenset(path for _, path in PASSTHROUGH_ROUTES)
