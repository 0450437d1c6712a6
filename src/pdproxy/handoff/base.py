"""Handoffs: how one engine family's PD protocol shapes the two legs of a request.

A handoff never touches sockets: it turns the client's parsed body into a *plan*, the calls the
orchestrator makes. Two kinds exist:

- sequential (`concurrent = False`): call P, then build D's call from P's answer (vLLM NIXL pull,
  omni LLMDataDist);
- concurrent (`concurrent = True`): both calls are known up front and made at once; P is watched
  while D is relayed (SGLang bootstrap, vLLM Mooncake). In every concurrent protocol D waits for KV
  that only P produces (SGLang: up to 300 s, Mooncake: up to 480 s), so a P that fails before D's
  first byte must cancel D at once (`cancel_decode_on_prefill_failure`).

Some protocols need per-upstream facts the proxy must learn before routing (SGLang P's bootstrap
port, Mooncake P's engine id per DP rank): `discover()` fetches them next to the health probe, the
result lives in `Upstream.meta`, and an upstream whose metadata cannot be had is not routable
(`Upstream.meta_error`). `plan()` only reads `prefill.meta` / `decode.meta`; it never fetches.

A handoff never interprets the KV handle it carries: whatever P returns goes to D unchanged.
A client-supplied handle or bootstrap field is never forwarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

#: `await fetch_json(url)` -> the parsed JSON body of a GET; raises (anything) on a transport error,
#: a non-2xx status or a body that is not JSON. Injected, so discovery runs on whatever client the
#: proxy uses.
FetchJson = Callable[[str], Awaitable[Any]]

#: Body fields a client may not set itself: each one steers the KV transfer of some engine family.
HANDOFF_FIELDS = frozenset({
    "kv_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "bootstrap_pair_key",
    "disagg_prefill_dp_rank",
    "routed_dp_rank",
    "data_parallel_rank",
})


class MetadataError(Exception):
    """An upstream's handoff metadata could not be had (its message goes into `describe()`)."""


@dataclass(slots=True)
class UpstreamCall:
    """One leg: the path, the serialised JSON body, and header lines for this leg only
    (`Name: value\\r\\n` each, on top of the request's own headers)."""

    path: str
    body: bytes
    headers: bytes = b""

    def sent(self) -> None:
        """Drop the body once the upstream answered: a stream's frames hold its call for the stream's whole life,
        and orjson's bytes take 4 KiB or more whatever their length."""
        self.body = b""


class Plan(Protocol):
    """The calls of one attempt on one (P, D) pair."""

    prefill: UpstreamCall

    def decode(self, prefill_answer: dict[str, Any] | None) -> tuple[UpstreamCall, bool]:
        """D's call and whether it carries a KV handle. Sequential plans build it from P's parsed
        answer; concurrent plans get None (D is called before P answers)."""
        ...

    def close(self) -> None:
        """Free what the plan holds (a bootstrap room, say); called once, whatever happened."""
        ...


class ConcurrentPlan:
    """A plan whose two calls are both fixed up front (Mooncake, NIXL push): nothing to free."""

    __slots__ = ("_decode", "prefill")

    def __init__(self, prefill: UpstreamCall, decode: UpstreamCall) -> None:
        self.prefill = prefill
        self._decode = decode

    def decode(self, prefill_answer: dict[str, Any] | None) -> tuple[UpstreamCall, bool]:
        return self._decode, True  # D's params are the proxy's own: always a handle

    def close(self) -> None:
        return None


class Handoff(Protocol):
    """An engine family's PD protocol."""

    name: ClassVar[str]
    concurrent: ClassVar[bool]
    #: Concurrent plans: D waits for KV only P makes, so P failing before D's first byte cancels D.
    cancel_decode_on_prefill_failure: ClassVar[bool]
    #: Roles whose upstreams need `discover()` before they may be routed to (empty: none).
    meta_roles: ClassVar[frozenset[Role]]
    #: Whether a D serves a plain request on its own (`--pd-min-prompt-tokens` sends it such requests).
    decode_serves_alone: ClassVar[bool]

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> Plan:
        """The plan for one attempt of `request` on `prefill` and `decode`."""
        ...

    async def discover(self, upstream: Upstream, fetch_json: FetchJson) -> dict[str, Any]:
        """This upstream's metadata (what `plan()` reads from `upstream.meta`); MetadataError when
        it cannot be had. Only called for upstreams whose role is in `meta_roles`."""
        ...


def without_handoff_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The client's body minus every field that steers a KV transfer (a copy only when needed)."""
    if HANDOFF_FIELDS.isdisjoint(body):
        return body
    return {key: value for key, value in body.items() if key not in HANDOFF_FIELDS}
