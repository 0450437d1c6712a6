"""omni-infer's LLMDataDist handoff (vLLM on Ascend): sequential, and P gets no request block.

Engine flags: omni-infer's vLLM with its LLMDataDist connector, which omni's plugin registers as
`AscendHcclConnectorV1` (omni/accelerators/pd/__init__.py -> llmdatadist_connector_v1.LLMDataDistConnector):
P `--kv-transfer-config '{"kv_connector":"AscendHcclConnectorV1","kv_role":"kv_producer",...}'`,
D the same with `"kv_role":"kv_consumer"`.

Why it differs from `vllm` (checked in omni-ai-npu/omni-infer
`omni/accelerators/pd/llmdatadist_connector_v1.py`, and in omni's nginx `prefill` module, which
is what its Global Proxy runs with `--engine-type vllm`):

- P's connector holds the KV of *every* request that ends capped by length and answers with
  `kv_transfer_params` {remote_block_ids, remote_cluster_id, remote_host_ip, ...}; it reads no
  request block, so P gets none (a stray one is not forwarded either).
- P's one-token body is vLLM's: max_tokens 1 (max_completion_tokens 1 when sent), stream false,
  no stream_options.
- D gets the client's body plus P's `kv_transfer_params`, unchanged (its ZMQ release address is
  inside them). Without params (P stopped on EOS before the length cap) D recomputes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pdproxy.handoff.base import FetchJson, without_handoff_fields
from pdproxy.handoff.vllm_nixl import SequentialPlan, one_token_body
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream


class OmniHandoff:
    """`--kv-adapter omni`: omni-infer LLMDataDist (sequential, no request block to P)."""

    name: ClassVar[str] = "omni"
    concurrent: ClassVar[bool] = False
    cancel_decode_on_prefill_failure: ClassVar[bool] = False
    meta_roles: ClassVar[frozenset[Role]] = frozenset()
    decode_serves_alone: ClassVar[bool] = True

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> SequentialPlan:
        body = without_handoff_fields(request.body)
        return SequentialPlan(request, one_token_body(body), body)

    async def discover(self, upstream: Upstream, fetch_json: FetchJson) -> dict[str, Any]:
        return {}
