"""The policy protocol every balancer implements, and what a policy may read of a request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pdproxy.upstreams import Upstream


class RoutingRequest(Protocol):
    """What a policy may read of a request: its prompt text (for chat, the rendered conversation)."""

    def prompt_prefix(self, limit: int) -> str: ...


class Balancer(Protocol):
    """Picks one upstream from a non-empty sequence of candidates.

    Candidates are routable and under their concurrency cap (the pool filters both), so a policy
    never reads health flags or caps. A policy never changes upstream state: in-flight counts come
    from the leases the flow takes on the upstream a policy returns.
    """

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream: ...
