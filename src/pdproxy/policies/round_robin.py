"""`round_robin`: smooth weighted round robin, as nginx does it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdproxy.policies.base import RoutingRequest
from pdproxy.upstreams import Upstream


class RoundRobin:
    """Smooth weighted round robin (nginx's): even interleaving, weights respected."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        current = self._current
        total = 0
        best = candidates[0]
        best_weight = -math.inf
        for upstream in candidates:
            weight = current.get(upstream.id, 0) + upstream.weight
            current[upstream.id] = weight
            total += upstream.weight
            if weight > best_weight:
                best, best_weight = upstream, weight
        current[best.id] = best_weight - total
        if len(current) > 2 * len(candidates) + 8:  # forget upstreams that left the pool
            keep = {u.id for u in candidates}
            self._current = {k: v for k, v in current.items() if k in keep}
        return best
