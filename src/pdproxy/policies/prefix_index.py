"""An approximate, bounded index of which prompt prefixes each server has recently prefilled.

Text is cut into fixed-size blocks of characters; each block's key hashes the previous key with
the block's text, so a key stands for the whole prefix up to the end of its block (as in vLLM's
prefix cache, with characters for tokens). Only whole blocks get keys: an engine caches only
full blocks too.

Per server, keys live in an LRU bounded by `max_blocks`. A request's keys are touched from the
last block to the first, so a prefix is always at least as recent as any of its extensions and
eviction removes the ends of prompts first. Hence the set a server holds is closed under
prefixes, and the matched length is found by binary search.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

_MASK = (1 << 63) - 1  # 63 bits: a key fits a signed 64-bit word of the shared decision feed
_MIX = 0x100000001B3  # FNV-1a's 64-bit prime: spreads the chained value before the next block mixes in


def block_keys(text: str, block_chars: int) -> list[int]:
    """Chained keys of the whole `block_chars`-sized blocks of `text` (a trailing partial block has none).

    Built on Python's string hash: randomised per process, which is fine for an index that lives
    in one process, and far cheaper than a cryptographic hash.
    """
    keys: list[int] = []
    key = 0
    for end in range(block_chars, len(text) + 1, block_chars):
        key = ((key * _MIX) ^ hash(text[end - block_chars:end])) & _MASK
        keys.append(key)
    return keys


class PrefixIndex:
    """Per server (by upstream id), the block keys it probably still holds, LRU-bounded.

    Servers absent from the candidates for longer than `forget_after` seconds are forgotten: a
    removed server's entries go, and one that was away long enough (restarted, say) starts cold.
    A server that is only briefly skipped (full, or ejected for a moment) keeps its entries.
    """

    __slots__ = ("_blocks", "_clock", "_forget_after", "_last_sweep", "_max_blocks", "_seen")

    def __init__(self, max_blocks: int, *, clock: Callable[[], float], forget_after: float) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self._max_blocks = max_blocks
        self._clock = clock
        self._forget_after = forget_after
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}
        self._seen: dict[Hashable, float] = {}
        self._last_sweep = clock()

    def matched(self, server: Hashable, keys: list[int]) -> int:
        """How many leading blocks of `keys` the server holds."""
        blocks = self._blocks.get(server)
        if not blocks or not keys or keys[0] not in blocks:
            return 0
        high = len(keys)
        if keys[-1] in blocks:
            return high
        low, high = 1, high - 1  # keys[:low] held, keys[:high + 1] not
        while low < high:
            mid = (low + high + 1) // 2
            if keys[mid - 1] in blocks:
                low = mid
            else:
                high = mid - 1
        return low

    def insert(self, server: Hashable, keys: list[int]) -> None:
        """The server now holds every block of `keys`; the oldest blocks beyond the bound are evicted."""
        blocks = self._blocks.get(server)
        if blocks is None:
            blocks = self._blocks[server] = OrderedDict()
        move = blocks.move_to_end
        for key in reversed(keys):
            if key in blocks:
                move(key)
            else:
                blocks[key] = None
        excess = len(blocks) - self._max_blocks
        for _ in range(excess):
            blocks.popitem(last=False)

    def seen(self, servers: Iterable[Hashable]) -> None:
        """Note the servers offered for a decision; forget those not offered for `forget_after` seconds."""
        now = self._clock()
        seen = self._seen
        for server in servers:
            seen[server] = now
        if now - self._last_sweep >= self._forget_after / 4:  # so a server goes within 1.25 × forget_after
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        for server, when in list(self._seen.items()):
            if now - when > self._forget_after:
                del self._seen[server]
                self._blocks.pop(server, None)
        for server in [s for s in self._blocks if s not in self._seen]:
            del self._blocks[server]

    def size(self, server: Hashable) -> int:
        """Blocks held for `server` (for tests and introspection)."""
        blocks = self._blocks.get(server)
        return len(blocks) if blocks else 0
