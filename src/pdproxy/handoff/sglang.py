"""SGLang's bootstrap handoff: P and D get the same body at once, paired by a bootstrap room.

Engine flags: P `python -m sglang.launch_server ... --disaggregation-mode prefill
[--disaggregation-bootstrap-port 8998] --disaggregation-transfer-backend mooncake|nixl|...`,
D `... --disaggregation-mode decode` with the same backend.

Wire details, from sgl-project/sglang `python/sglang/srt/disaggregation/mini_lb.py` (@001c2ae0) and
sgl-model-gateway `src/routers/http/pd_router.rs` (@004dcda2):

- Both legs get the client's body on the client's path plus `bootstrap_host` (P's host, IPv6 in
  brackets), `bootstrap_port` (P's bootstrap server port, or null: D then uses its own) and
  `bootstrap_room`; max_tokens and stream are left alone. P samples the first token and hands it to
  D with the KV, so D's output is the whole answer and P's is discarded.
- A batch gets one entry per item in each of the three fields (pd_router's
  get_completion_batch_size / get_chat_batch_size): a completions `prompt` that is a list of
  prompts, a chat request with `n` > 1.
- Both are sent at once and both awaited: P answers only after D has taken the room's KV, so a
  proxy that waits for P before calling D deadlocks until SGLang's 300 s bootstrap timeout.
- P's bootstrap port is in `GET /get_server_info` (its server args, flattened into the top-level
  object) as `disaggregation_bootstrap_port`, default 8998; an operator override wins.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import urlsplit

import orjson

from pdproxy.handoff.base import FetchJson, MetadataError, UpstreamCall, without_handoff_fields
from pdproxy.handoff.discovery import fetch_meta, overrides_for
from pdproxy.handoff.rooms import RoomRegistry
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

SERVER_INFO_PATH = "/get_server_info"


def host_of(url: str) -> str:
    """The host of a normalised upstream URL, an IPv6 address in brackets (as mini_lb sends it)."""
    host = urlsplit(url).hostname or ""
    return f"[{host}]" if ":" in host else host


def batch_size(endpoint: str, body: dict[str, Any]) -> int | None:
    """How many generations SGLang makes of this body, when it is a batch; None for one."""
    if endpoint.endswith("/chat/completions"):
        n = body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)  # a list of prompts (strings or token-id lists); a list of ints is one prompt
    return None


class SglangPlan:
    """One attempt: the same call to P and D; holds its rooms until closed."""

    __slots__ = ("_registry", "prefill", "rooms")

    def __init__(self, call: UpstreamCall, rooms: tuple[int, ...], registry: RoomRegistry) -> None:
        self.prefill = call
        self.rooms = rooms
        self._registry = registry

    def decode(self, prefill_answer: dict[str, Any] | None) -> tuple[UpstreamCall, bool]:
        # The room is D's handle. A call of its own (the same bytes): D's leg drops its body once answered.
        return UpstreamCall(self.prefill.path, self.prefill.body, self.prefill.headers), True

    def close(self) -> None:
        self._registry.release(self.rooms)


class SglangHandoff:
    """`--kv-adapter sglang`: SGLang PD disaggregation (concurrent, bootstrap room)."""

    name: ClassVar[str] = "sglang"
    concurrent: ClassVar[bool] = True
    cancel_decode_on_prefill_failure: ClassVar[bool] = True  # D would wait for the room's KV for 300 s
    meta_roles: ClassVar[frozenset[Role]] = frozenset({Role.PREFILL})
    decode_serves_alone: ClassVar[bool] = False  # a decode-mode server needs a bootstrap room

    def __init__(
        self, rooms: RoomRegistry | None = None, overrides: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self.rooms = rooms if rooms is not None else RoomRegistry()
        self._overrides = overrides or {}

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> SglangPlan:
        body = dict(without_handoff_fields(request.body))
        host = prefill.meta.get("bootstrap_host") or host_of(prefill.url)
        port = prefill.meta.get("bootstrap_port")
        size = batch_size(request.endpoint, body)
        rooms = self.rooms.take(size or 1)
        if size is None:
            body.update(bootstrap_host=host, bootstrap_port=port, bootstrap_room=rooms[0])
        else:
            body.update(bootstrap_host=[host] * size, bootstrap_port=[port] * size, bootstrap_room=list(rooms))
        return SglangPlan(UpstreamCall(request.endpoint, orjson.dumps(body)), rooms, self.rooms)

    async def discover(self, upstream: Upstream, fetch_json: FetchJson) -> dict[str, Any]:
        """P's bootstrap port: the operator's override, else P's own `/get_server_info`."""
        meta = overrides_for(self._overrides, upstream)
        if "bootstrap_port" in meta:
            return meta
        info = await fetch_meta(fetch_json, upstream.url + SERVER_INFO_PATH)
        if not isinstance(info, dict):
            raise MetadataError(f"GET {SERVER_INFO_PATH} answered no JSON object")
        mode = info.get("disaggregation_mode")
        if mode is not None and mode != "prefill":
            raise MetadataError(f"not a prefill server: its disaggregation_mode is {mode!r}")
        port = info.get("disaggregation_bootstrap_port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise MetadataError(f"GET {SERVER_INFO_PATH} has no valid disaggregation_bootstrap_port ({port!r})")
        return {**meta, "bootstrap_port": port}
