"""`least_conn`: fewest in-flight requests per unit of weight."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from pdproxy.policies.base import RoutingRequest
from pdproxy.upstreams import Upstream


class LeastConn:
    """Fewest in-flight requests per unit of weight; ties broken at random so a burst spreads."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        best: list[Upstream] = []
        best_load = math.inf
        for upstream in candidates:
            load = upstream.load / upstream.weight
            if load < best_load:
                best_load = load
                best = [upstream]
            elif load == best_load:
                best.append(upstream)
        return best[0] if len(best) == 1 else self._rng.choice(best)
