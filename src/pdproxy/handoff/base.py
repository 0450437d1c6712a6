"""Handoffs: how one engine family's PD protocol shapes the two legs of a request.

A handoff never touches sockets: it turns the client's parsed body into a *plan*, the calls the
orchestrator makes. Two kinds exist:

- sequential (`concurrent = False`): call P, then build D's call from P's answer (vLLM NIXL pull,
  omni LLMDataDist);
- concurrent (`concurrent = True`): both calls are known up front and made at once; P is watched
  while D is relayed (SGLang bootstrap, vLLM Mooncake, NIXL push).

A handoff never interprets the KV handle it carries: whatever P returns goes to D unchanged.
A client-supplied handle or bootstrap field is never forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Upstream


@dataclass(slots=True, frozen=True)
class UpstreamCall:
    """One leg: the path, the serialised JSON body, and header lines for this leg only
    (`Name: value\\r\\n` each, on top of the request's own headers)."""

    path: str
    body: bytes
    headers: bytes = b""


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


class Handoff(Protocol):
    """An engine family's PD protocol."""

    name: ClassVar[str]
    concurrent: ClassVar[bool]

    def plan(self, request: ProxyRequest, prefill: Upstream, decode: Upstream) -> Plan:
        """The plan for one attempt of `request` on `prefill` and `decode`."""
        ...
