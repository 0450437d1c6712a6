"""The decision feed: each worker appends its prefix decisions to its own ring; the others replay them.

So the approximate prefix index of every worker learns every worker's decisions: a decision
applies the feed first, so it sees all decisions published before it (at most the other
workers' current decisions race it). The keys are `prefix_index.block_keys`, built on Python's
string hash: the supervisor gives all workers one PYTHONHASHSEED so the keys agree.

A reader that falls a whole ring behind (a worker stalled for ~2000 decisions) skips to the head
and counts what it lost: the index is approximate anyway.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Sequence

from pdproxy.routing.table import SharedTable

PAD = 0  # a server key is never 0: a 0 word means "the rest of the ring is padding"


class DecisionFeed:
    """Writer of this worker's ring and reader of the others'; one per policy (each keeps its positions)."""

    def __init__(self, table: SharedTable, worker: int) -> None:
        self.table = table
        self.worker = worker
        self.lost = 0  # entries skipped because a ring lapped this reader
        self._slots = table.feed_slots
        self._bases = [table.feed_base(w) for w in range(table.workers)]
        words = table.words
        self._positions = [words[base] for base in self._bases]  # start from now: the past is not replayed

    def publish(self, server: int, keys: Sequence[int]) -> None:
        """Append one decision: `server` now probably holds `keys` (trimmed to fit one ring)."""
        words = self.table.words
        base = self._bases[self.worker]
        slots = self._slots
        keys = keys[:slots - 2]
        size = len(keys) + 2
        head = words[base]
        offset = head % slots
        if offset + size > slots:  # no wrapping: pad to the end, start at slot 0
            words[base + 1 + offset] = PAD
            head += slots - offset
            offset = 0
        start = base + 1 + offset
        words[start] = server
        words[start + 1] = len(keys)
        words[start + 2:start + size] = array.array("q", keys)
        words[base] = head + size  # last: a reader never sees an entry before its words

    def drain(self, apply: Callable[[int, list[int]], None]) -> int:
        """Apply every other worker's entries published since the last drain; how many were applied."""
        words = self.table.words
        slots = self._slots
        positions = self._positions
        applied = 0
        for worker, base in enumerate(self._bases):
            if worker == self.worker:
                continue
            head = words[base]
            position = positions[worker]
            if head == position:
                continue
            if head - position > slots:  # lapped: what was there is overwritten
                self.lost += 1
                positions[worker] = head
                continue
            entries = self._read(base, position, head)
            if words[base] - slots > position:  # the writer lapped us while we read: discard it all
                self.lost += 1
                positions[worker] = words[base]
                continue
            positions[worker] = head
            for server, keys in entries:
                apply(server, keys)
                applied += 1
        return applied

    def _read(self, base: int, position: int, head: int) -> list[tuple[int, list[int]]]:
        words = self.table.words
        slots = self._slots
        entries = []
        while position < head:
            offset = position % slots
            start = base + 1 + offset
            server = words[start]
            if server == PAD:
                position += slots - offset
                continue
            count = words[start + 1]
            if count < 0 or offset + 2 + count > slots:  # cannot happen unless the ring was overwritten
                break
            entries.append((server, words[start + 2:start + 2 + count].tolist()))
            position += 2 + count
        return entries

