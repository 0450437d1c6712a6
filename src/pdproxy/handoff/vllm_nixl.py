"""vLLM's `kv_transfer_params` handoff (NixlConnector, pull mode): sequential.

P gets the client's body as a one-token, non-streamed request with `do_remote_decode`; its answer's
`kv_transfer_params` goes, unchanged, into D's body, which is otherwise the client's own. Rewriting
the handle (e.g. `remote_host`) would break deployments whose KV side channel is not on the HTTP
address, so it is carried opaquely.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from pdproxy.handoff.base import FetchJson, UpstreamCall
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

# Only `do_remote_decode` matters to vLLM; the null keys are what its reference proxy sends.
PREFILL_REQUEST: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# Removed from the prefill body: vLLM rejects stream_options without stream, and min_tokens > max_tokens.
PREFILL_DROPPED = ("stream_options", "min_tokens", "min_completion_tokens")


def one_token_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's body as a prefill: one token, not streamed (shared by the sequential handoffs).
    vLLM's tokens-in body (`/inference/v1/generate`) keeps its limits in `sampling_params`."""
    prefill = {key: value for key, value in body.items() if key not in PREFILL_DROPPED}
    prefill["stream"] = False
    params = body.get("sampling_params")
    if isinstance(params, dict) and "token_ids" in body:
        prefill["sampling_params"] = {**{k: v for k, v in params.items() if k not in PREFILL_DROPPED},
                                      "max_tokens": 1}
        return prefill
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in body:  # it wins over max_tokens for chat: P would generate otherwise
        prefill["max_completion_tokens"] = 1
    return prefill


def with_handle(body: dict[str, Any], handle: Any) -> tuple[dict[str, Any], bool]:
    """D's body: the client's, with P's handle (or without any when P gave none: D then recomputes)."""
    if handle is None:
        if "kv_transfer_params" in body:  # the client's own handle is never forwarded
            return {k: v for k, v in body.items() if k != "kv_transfer_params"}, False
        return body, False
    return {**body, "kv_transfer_params": handle}, True


class SequentialPlan:
    """P's call made once per attempt; D's built from P's answer."""

    __slots__ = ("_body", "_path", "prefill")

    def __init__(
        self, request: ProxyRequest, prefill_body: dict[str, Any], decode_body: dict[str, Any] | None = None
    ) -> None:
        self._body = request.body if decode_body is None else decode_body  # D's body before the handle
        self._path = request.endpoint
        self.prefill = UpstreamCall(request.endpoint, orjson.dumps(prefill_body))

    def decode(self, prefill_answer: dict[str, Any] | None) -> tuple[UpstreamCall, bool]:
        handle = prefill_answer.get("kv_transfer_params") if prefill_answer else None
        body, has_handle = with_handle(self._body, handle)
        return UpstreamCall(self._path, orjson.dumps(body)), has_handle

    def close(self) -> None:
        return None


class VllmNixlHandoff:
    """`--kv-adapter vllm`: vLLM NixlConnector (pull); the default."""

    name: ClassVar[str] = "vllm"
    concurrent: ClassVar[bool] = False
    cancel_decode_on_prefill_failure: ClassVar[bool] = False  # D is called only after P answered
    meta_roles: ClassVar[frozenset[Role]] = frozenset()  # the handle carries every address D needs
    decode_serves_alone: ClassVar[bool] = True

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> SequentialPlan:
        body = one_token_body(request.body)
        body["kv_transfer_params"] = dict(PREFILL_REQUEST)
        return SequentialPlan(request, body)

    async def discover(self, upstream: Upstream, fetch_json: FetchJson) -> dict[str, Any]:
        return {}
