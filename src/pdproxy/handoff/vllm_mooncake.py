"""vLLM's MooncakeConnector handoff: concurrent; the proxy builds D's params from P's bootstrap server.

Engine flags: P `vllm serve ... --kv-transfer-config
'{"kv_connector":"MooncakeConnector","kv_role":"kv_producer"}'` (its rank-0 worker serves the
bootstrap server on VLLM_MOONCAKE_BOOTSTRAP_PORT, default 8998), D the same with
`"kv_role":"kv_consumer"`.

Wire details, from vllm-project/vllm
`examples/disaggregated/mooncake_connector/mooncake_connector_proxy.py` (@41c5903d) and
`vllm/distributed/kv_transfer/kv_connector/v1/mooncake/mooncake_utils.py` (@e7ad92e5):

- P's bootstrap server answers `GET /query` with `{dp_rank: {engine_id, worker_addr}}`; it is not
  on P's HTTP port and P's HTTP API does not tell its port, so the port is configured (default
  8998, per-server override `bootstrap_port` or a whole `bootstrap_addr`).
- P gets vLLM's one-token body with `kv_transfer_params` {do_remote_decode: true,
  do_remote_prefill: false, transfer_id} and the header `X-data-parallel-rank: <rank>`; the proxy
  spreads requests over P's DP ranks. P answers no params.
- D gets the client's body with {do_remote_decode: false, do_remote_prefill: true,
  remote_bootstrap_addr: "http://<P host>:<port>", remote_engine_id: <that rank's engine_id>,
  transfer_id}; it asks P's workers for the KV by transfer_id, and P writes it once its own prefill
  is done.
- P and D are called at once. The reference proxy fires P and forgets it; here P is watched: if P
  fails, D would wait up to VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT (480 s) for KV that never comes,
  so D is cancelled at once.
- The transfer_id is the only pairing key: a fresh one per attempt, so a retried pair never meets
  the blocks of the attempt before it (the push demo does the same).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

from pdproxy.handoff.base import ConcurrentPlan, FetchJson, MetadataError, UpstreamCall, without_handoff_fields
from pdproxy.handoff.discovery import fetch_meta, overrides_for
from pdproxy.handoff.sglang import host_of
from pdproxy.handoff.vllm_nixl import one_token_body
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

DEFAULT_BOOTSTRAP_PORT = 8998  # VLLM_MOONCAKE_BOOTSTRAP_PORT's default
QUERY_PATH = "/query"
DP_RANK_HEADER = "X-data-parallel-rank"


class MooncakeHandoff:
    """`--kv-adapter mooncake`: vLLM MooncakeConnector (concurrent, params built by the proxy)."""

    name: ClassVar[str] = "mooncake"
    concurrent: ClassVar[bool] = True
    cancel_decode_on_prefill_failure: ClassVar[bool] = True  # D would wait 480 s for P's KV
    meta_roles: ClassVar[frozenset[Role]] = frozenset({Role.PREFILL})
    decode_serves_alone: ClassVar[bool] = True

    def __init__(
        self,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._overrides = overrides or {}
        self._bootstrap_port = bootstrap_port
        self._new_id = new_id
        self._turn = itertools.count()  # spreads requests over each P's DP ranks

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> ConcurrentPlan:
        ranks: list[tuple[int, str]] = prefill.meta["engine_ids"]  # discovered: P is routable only then
        rank, engine_id = ranks[next(self._turn) % len(ranks)]
        transfer_id = f"xfer-{self._new_id()}"
        body = without_handoff_fields(request.body)
        prefill_body = one_token_body(body)
        prefill_body["kv_transfer_params"] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "transfer_id": transfer_id,
        }
        decode_body = {
            **body,
            "kv_transfer_params": {
                "do_remote_decode": False,
                "do_remote_prefill": True,
                "remote_bootstrap_addr": prefill.meta["bootstrap_addr"],
                "remote_engine_id": engine_id,
                "transfer_id": transfer_id,
            },
        }
        return ConcurrentPlan(
            UpstreamCall(request.endpoint, orjson.dumps(prefill_body), f"{DP_RANK_HEADER}: {rank}\r\n".encode()),
            UpstreamCall(request.endpoint, orjson.dumps(decode_body)),
        )

    def bootstrap_addr(self, upstream: Upstream) -> str:
        meta = overrides_for(self._overrides, upstream)
        if "bootstrap_addr" in meta:
            return str(meta["bootstrap_addr"]).rstrip("/")
        return f"http://{host_of(upstream.url)}:{int(meta.get('bootstrap_port', self._bootstrap_port))}"

    async def discover(self, upstream: Upstream, fetch_json: FetchJson) -> dict[str, Any]:
        """P's bootstrap address and its engine id per DP rank, from its bootstrap server's `/query`."""
        addr = self.bootstrap_addr(upstream)
        entries = await fetch_meta(fetch_json, addr + QUERY_PATH)
        if not isinstance(entries, dict) or not entries:
            raise MetadataError(f"GET {addr}{QUERY_PATH}: no prefill worker has registered yet")
        ranks: list[tuple[int, str]] = []
        for key, entry in entries.items():
            engine_id = entry.get("engine_id") if isinstance(entry, dict) else None
            try:
                rank = int(key)
            except (TypeError, ValueError):
                rank = -1
            if rank < 0 or not isinstance(engine_id, str) or not engine_id:
                raise MetadataError(f"GET {addr}{QUERY_PATH}: unexpected entry {key!r}: {entry!r}")
            ranks.append((rank, engine_id))
        ranks.sort()
        return {"bootstrap_addr": addr, "engine_ids": ranks}
