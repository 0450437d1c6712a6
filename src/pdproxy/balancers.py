"""Load-balancing policies: one class per policy behind `Balancer.choose`.

Policies receive only routable upstreams (the pool filters health) and never
change upstream state; in-flight counts come from leases. Randomness is
injected so tests are deterministic.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from pdproxy.upstreams import Upstream


class RoutingRequest(Protocol):
    """What a policy may read of a request."""

    def prompt_prefix(self, limit: int) -> str: ...


class Balancer(Protocol):
    """Picks one upstream from a non-empty sequence of routable candidates."""

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream: ...


class LeastConn:
    """Fewest in-flight requests per unit of weight; ties broken at random so a burst spreads."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        best: list[Upstream] = []
        best_load = math.inf
        for upstream in candidates:
            load = upstream.in_flight / upstream.weight
            if load < best_load:
                best_load = load
                best = [upstream]
            elif load == best_load:
                best.append(upstream)
        return best[0] if len(best) == 1 else self._rng.choice(best)


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


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PrefixHash:
    """Consistent hashing of the prompt's first characters, with bounded load.

    Each upstream owns `vnodes × weight` points on a ring, placed by hashing its
    url, so membership changes move only the keys of the upstream that changed.
    A request walks the ring from its key's point and takes the first upstream
    whose in-flight stays within `(1 + load_factor) ×` its weighted share of
    the total (consistent hashing with bounded loads, Mirrokni et al. 2016).
    """

    def __init__(self, prefix_chars: int, vnodes: int, load_factor: float) -> None:
        self._prefix_chars = prefix_chars
        self._vnodes = vnodes
        self._load_factor = load_factor
        self._ring_key: tuple[tuple[str, int], ...] = ()
        self._points: list[int] = []
        self._owners: list[Upstream] = []

    def _ring(self, candidates: Sequence[Upstream]) -> None:
        key = tuple((u.id, u.weight) for u in candidates)
        if key == self._ring_key:
            return
        ring = sorted(
            (_hash64(f"{u.url}#{i}"), index)
            for index, u in enumerate(candidates)
            for i in range(self._vnodes * u.weight)
        )
        self._points = [point for point, _ in ring]
        self._owners = [candidates[index] for _, index in ring]
        self._ring_key = key

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        if len(candidates) == 1:
            return candidates[0]
        self._ring(candidates)
        start = bisect.bisect(self._points, _hash64(request.prompt_prefix(self._prefix_chars)))
        total = sum(u.in_flight for u in candidates) + 1
        total_weight = sum(u.weight for u in candidates)
        seen: set[str] = set()
        owners = self._owners
        for step in range(len(owners)):
            upstream = owners[(start + step) % len(owners)]
            if upstream.url in seen:
                continue
            seen.add(upstream.url)
            capacity = math.ceil((1 + self._load_factor) * total * upstream.weight / total_weight)
            if upstream.in_flight + 1 <= capacity:
                return upstream
            if len(seen) == len(candidates):
                break
        return min(candidates, key=lambda u: u.in_flight / u.weight)


PolicyFactory = Callable[..., Balancer]

POLICIES: dict[str, PolicyFactory] = {
    "least_conn": lambda *, rng, **_: LeastConn(rng),
    "round_robin": lambda **_: RoundRobin(),
    "prefix_hash": lambda *, prefix_chars, vnodes, load_factor, **_: PrefixHash(
        prefix_chars, vnodes, load_factor
    ),
}


def make_balancer(
    name: str, *, rng: random.Random, prefix_chars: int, vnodes: int, load_factor: float
) -> Balancer:
    """Build the named policy; an unknown name raises ValueError listing the valid ones."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    return factory(rng=rng, prefix_chars=prefix_chars, vnodes=vnodes, load_factor=load_factor)
