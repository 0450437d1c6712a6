"""`least_tokens`: least estimated prompt tokens in flight per unit of weight (omni-infer's default).

Better than `least_conn` for prefill when prompt lengths vary a lot: ten short prompts cost a
prefill server less than one very long one.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdproxy.policies.base import RoutingRequest
from pdproxy.policies.ledger import InFlightTokens
from pdproxy.policies.tokens import TokenCounter
from pdproxy.upstreams import Upstream

if TYPE_CHECKING:
    from pdproxy.routing.engine_load import EngineLoads

WHOLE = sys.maxsize  # prompt_prefix(WHOLE): the whole prompt, for chat the whole rendered conversation


class LeastTokens:
    """The server whose in-flight prompt tokens plus this request's would be least per unit of weight.

    Ties go to fewer in-flight requests, then to the injected rng. In-flight tokens are kept by an
    `InFlightTokens` ledger reconciled with the lease counts, so the flow needs no extra callback.
    """

    def __init__(self, rng: random.Random, counter: TokenCounter) -> None:
        self._rng = rng
        self._counter = counter
        self._ledger = InFlightTokens()
        self._engines: EngineLoads | None = None
        self._mean_tokens = 0.0  # moving mean of a request's tokens: engine requests -> tokens

    def use_engine_load(self, loads: EngineLoads) -> None:
        """Count the engines' own running and waiting requests too (never less than our own)."""
        self._engines = loads

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        tokens = self._counter.count(request.prompt_prefix(WHOLE))
        ledger = self._ledger
        best: list[Upstream] = []
        best_key = (float("inf"), float("inf"))
        engines = self._engines
        per_request = self._mean_tokens or tokens
        for upstream in candidates:
            queued, requests = ledger.tokens(upstream), upstream.load
            if engines is not None:
                busy = engines.requests(upstream)
                queued, requests = max(queued, busy * per_request), max(requests, busy)
            key = ((queued + tokens) / upstream.weight, requests / upstream.weight)
            if key < best_key:
                best_key = key
                best = [upstream]
            elif key == best_key:
                best.append(upstream)
        chosen = best[0] if len(best) == 1 else self._rng.choice(best)
        ledger.add(chosen, tokens)
        self._mean_tokens += (tokens - self._mean_tokens) / 32
        return chosen

    def in_flight_tokens(self, upstream: Upstream) -> int:
        """The ledger's view of `upstream` (for tests and introspection)."""
        return self._ledger.tokens(upstream)
