"""Bootstrap rooms in flight: random 63-bit integers, never two alike at once.

SGLang pairs a P and a D request by `bootstrap_room` alone, and two live requests with the same
room crash both schedulers (sgl-project/sglang #40125), so a room is drawn uniformly from
[0, 2**63 - 1] (as sgl-model-gateway's pd_router and mini_lb do) and re-drawn while it is taken.
Uniqueness holds per proxy process; across processes a clash needs two equal 63-bit draws.
"""

from __future__ import annotations

import random

ROOM_BITS = 63


class RoomRegistry:
    """Hands out rooms unique among those not yet released; O(1) per room."""

    __slots__ = ("_in_flight", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()  # seeded from os.urandom
        self._in_flight: set[int] = set()

    def take(self, count: int = 1) -> tuple[int, ...]:
        """`count` fresh rooms, distinct from each other and from every room in flight."""
        rooms: list[int] = []
        for _ in range(count):
            room = self._rng.getrandbits(ROOM_BITS)
            while room in self._in_flight:  # only a clashing draw loops; a repeating rng would loop forever
                room = self._rng.getrandbits(ROOM_BITS)
            self._in_flight.add(room)
            rooms.append(room)
        return tuple(rooms)

    def release(self, rooms: tuple[int, ...]) -> None:
        """Give rooms back (idempotent per room)."""
        for room in rooms:
            self._in_flight.discard(room)

    def __len__(self) -> int:
        return len(self._in_flight)
