"""`prefix_hash`: consistent hashing of the prompt's first characters, with bounded load."""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from pdproxy.policies.base import RoutingRequest
from pdproxy.upstreams import Upstream


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


MAX_RINGS = 16


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
        # Rings of recent candidate sets: one per served model (pdproxy.served_models) when several take
        # turns, so alternating models never rebuild a ring per request. Bounded: cleared when full.
        self._rings: dict[tuple[tuple[str, int], ...], tuple[list[int], list[Upstream]]] = {}

    def _ring(self, candidates: Sequence[Upstream]) -> None:
        key = tuple((u.id, u.weight) for u in candidates)
        if key == self._ring_key:
            return
        ring = self._rings.get(key)
        if ring is None:
            points = sorted(
                (_hash64(f"{u.url}#{i}"), index)
                for index, u in enumerate(candidates)
                for i in range(self._vnodes * u.weight)
            )
            ring = [point for point, _ in points], [candidates[index] for _, index in points]
            if len(self._rings) >= MAX_RINGS:
                self._rings.clear()
            self._rings[key] = ring
        self._points, self._owners = ring
        self._ring_key = key

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        if len(candidates) == 1:
            return candidates[0]
        self._ring(candidates)
        start = bisect.bisect(self._points, _hash64(request.prompt_prefix(self._prefix_chars)))
        total = sum(u.load for u in candidates) + 1
        total_weight = sum(u.weight for u in candidates)
        seen: set[str] = set()
        owners = self._owners
        for step in range(len(owners)):
            upstream = owners[(start + step) % len(owners)]
            if upstream.url in seen:
                continue
            seen.add(upstream.url)
            capacity = math.ceil((1 + self._load_factor) * total * upstream.weight / total_weight)
            if upstream.load + 1 <= capacity:
                return upstream
            if len(seen) == len(candidates):
                break
        return min(candidates, key=lambda u: u.load / u.weight)
