"""vLLM KV-cache events: their wire format, and the exact view of one prefill server's prefix cache.

vLLM (`--kv-events-config`, publisher "zmq") sends each batch as three ZMQ frames: topic, an
8-byte big-endian sequence number (from 0, +1 per batch), and a msgpack `KVEventBatch`
`[ts, [event, ...], data_parallel_rank?]`. In vLLM 0.32 each event is a tagged map
(`{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., "token_ids": [...],
"block_size": n, ...}`, `{"type": "BlockRemoved", ...}`, `{"type": "AllBlocksCleared"}`); older
versions sent tagged arrays (`["BlockStored", block_hashes, parent, token_ids, block_size, ...]`),
which the decoder takes too. Block hashes are ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the
default) or bytes.

Why the view keeps its own keys: the engine's block hashes depend on its hash function and seed
(`--prefix-caching-hash-algo`, NONE_HASH from PYTHONHASHSEED) and can be bytes or ints. A
BlockStored event also carries the blocks' token ids and its parent's hash, so the view maps
each engine hash to `chain_key(parent key, block tokens)`, a key the request side computes from
the same tokens. The request's keys then match whatever hash the engine used.

States, per server (what `describe()` shows):
  exact     events applied in sequence since a known start (empty or a complete replay)
  degraded  a gap was seen (or the server restarted): replaying; the view is not used
  fallback  no usable events (none yet, replay unavailable or failed): the approximate index decides
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

log = logging.getLogger("pdproxy.kv_events")

EXACT, DEGRADED, FALLBACK = "exact", "degraded", "fallback"
STATES = (EXACT, DEGRADED, FALLBACK)
END_SEQ = -1  # the replay socket's last message
_MASK = (1 << 63) - 1
MAX_PENDING = 10_000  # live batches kept while a replay runs; beyond that the view starts again
MAX_REMOVALS = 65_536  # removed keys remembered for `forgot_since` (the oldest go first)


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a block: its parent's key (0 for the first block) and its token ids.

    Built on the hash of a tuple of ints, which Python does not randomise: every process and
    every replica computes the same keys."""
    return hash((parent, *tokens)) & _MASK


def block_keys_of_tokens(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained keys of the whole `block_size` blocks of `tokens`: what the engine caches of a prompt."""
    keys: list[int] = []
    key = 0
    for end in range(block_size, len(tokens) + 1, block_size):
        key = chain_key(key, tokens[end - block_size:end])
        keys.append(key)
    return keys


class BadBatch(ValueError):
    """A message that is not a vLLM KV-event batch."""


@dataclass(frozen=True, slots=True)
class Stored:
    block_hashes: list[Any]
    parent: Any
    token_ids: list[int]
    block_size: int


@dataclass(frozen=True, slots=True)
class Removed:
    block_hashes: list[Any]


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared
_decoder = msgspec.msgpack.Decoder()


def _hashable(value: Any) -> Any:
    if isinstance(value, int | bytes | str) and not isinstance(value, bool):
        return value
    raise BadBatch(f"a block hash must be an int or bytes, got {type(value).__name__}")


def _event(raw: Any) -> Event:
    if isinstance(raw, dict):
        kind = raw.get("type")
        fields = raw
        get = fields.get
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
                 "BlockRemoved": ("block_hashes",), "AllBlocksCleared": ()}.get(kind, ())
        fields = dict(zip(names, raw[1:], strict=False))
        get = fields.get
    else:
        raise BadBatch("an event must be a tagged array or map")
    if kind == "BlockStored":
        hashes, tokens, size = get("block_hashes"), get("token_ids"), get("block_size")
        if not isinstance(hashes, list) or not isinstance(tokens, list) or not isinstance(size, int) or size < 1:
            raise BadBatch("BlockStored needs block_hashes, token_ids and a block_size >= 1")
        if len(tokens) != len(hashes) * size or not all(isinstance(t, int) for t in tokens):
            raise BadBatch("BlockStored token_ids must be block_size ints per block hash")
        parent = get("parent_block_hash")
        return Stored([_hashable(h) for h in hashes], None if parent is None else _hashable(parent), tokens, size)
    if kind == "BlockRemoved":
        hashes = get("block_hashes")
        if not isinstance(hashes, list):
            raise BadBatch("BlockRemoved needs block_hashes")
        return Removed([_hashable(h) for h in hashes])
    if kind == "AllBlocksCleared":
        return Cleared()
    raise BadBatch(f"unknown event type {kind!r}")


def decode_batch(payload: bytes) -> list[Event]:
    """The events of one msgpack KVEventBatch; BadBatch when it is not one."""
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise BadBatch(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):
        events = raw.get("events")
    elif isinstance(raw, list) and len(raw) >= 2:
        events = raw[1]
    else:
        raise BadBatch("a batch must be [ts, events, ...] or a map with events")
    if not isinstance(events, list):
        raise BadBatch("a batch's events must be a list")
    return [_event(e) for e in events]


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise BadBatch("a sequence number is 8 bytes")
    return int.from_bytes(frame, "big", signed=True)


@dataclass(slots=True)
class ServerCache:
    """The exact view of one server's prefix cache, fed by its event stream (in order) and replays.

    The subscriber calls `live` for each message of the PUB socket and `replayed` with what the
    replay socket returned; `replay_from` tells it where a replay must start (None: none needed).
    `on_state` is told of every state change (metrics and log lines)."""

    name: str
    on_state: Callable[[ServerCache, str, str], None] = lambda cache, state, why: None
    clock: Callable[[], float] = time.monotonic
    state: str = FALLBACK
    reason: str = "no events yet"
    next_seq: int | None = None  # the sequence number expected next; None: no known start
    block_size: int | None = None
    garbage: int = 0  # messages ignored because they were not KV-event batches
    unchained: int = 0  # stored blocks whose parent the view never saw (skipped)
    replay_from: int | None = 0  # a new view first asks for the whole history
    last_event_at: float | None = None
    applied: int = 0  # batches applied (and clears): a mark for "what the events said since" (`forgot_since`)
    cleared_at: int = 0  # `applied` when the view was last emptied
    _removed: dict[int, int] = field(default_factory=dict)  # chain key -> `applied` when its last holder went
    _keys: dict[Any, int] = field(default_factory=dict)  # engine block hash -> chain key
    _held: dict[int, int] = field(default_factory=dict)  # chain key -> engine blocks holding it
    _pending: dict[int, list[Event]] = field(default_factory=dict)  # live batches past a gap

    # -- reading ---------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state == EXACT

    def matched(self, keys: Sequence[int]) -> int:
        """Leading blocks of `keys` the server holds (0 unless the view is exact)."""
        if self.state != EXACT:
            return 0
        held = self._held
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count

    def forgot_since(self, key: int, mark: int) -> bool:
        """Whether the events removed `key` (or emptied the view) after `applied` was `mark`.

        A policy that sent a block to this server when `applied` was `mark` counts it as held
        until the events catch up; a removal applied since then is newer news than that send
        (the engine evicted it, on a busy server within the lag), so the send no longer counts."""
        return self.cleared_at > mark or self._removed.get(key, -1) > mark

    def blocks(self) -> int:
        return len(self._held)

    def describe(self) -> dict[str, object]:
        return {"state": self.state, "reason": self.reason, "next_seq": self.next_seq, "blocks": len(self._held),
                "block_size": self.block_size, "garbage": self.garbage, "unchained": self.unchained}

    # -- feeding ---------------------------------------------------------------------------------

    def live(self, seq: int, payload: bytes) -> None:
        """One message from the PUB socket."""
        try:
            events = decode_batch(payload)
        except BadBatch as exc:
            self.garbage += 1
            log.debug("%s: ignored a message that is not a KV-event batch: %s", self.name, exc)
            return
        expected = self.next_seq
        if expected is not None and seq < expected:  # the sequence started again: a new engine
            self._restart(f"sequence went back from {expected} to {seq}: the engine restarted")
            self._pending[seq] = events
            return
        if expected is None or seq > expected or self.replay_from is not None:
            if len(self._pending) >= MAX_PENDING:
                self._restart("too many batches while waiting for a replay")
            self._pending[seq] = events
            if expected is not None and seq > expected and self.replay_from is None:
                self._set(DEGRADED, f"gap: expected {expected}, got {seq}")
                self.replay_from = expected
            return
        self._apply(events)
        self.next_seq = seq + 1

    def replayed(self, batches: Iterable[tuple[int, bytes]] | None) -> None:
        """What a replay from `replay_from` returned; None when the replay socket did not answer."""
        start = self.replay_from
        if start is None:
            return
        if batches is None:
            self._clear()
            self.next_seq = None
            self._set(FALLBACK, "replay unavailable")
            return  # replay_from stays: the subscriber tries again later
        decoded: list[tuple[int, list[Event]]] = []
        for seq, payload in batches:
            if seq < start:
                continue
            try:
                decoded.append((seq, decode_batch(payload)))
            except BadBatch:
                self.garbage += 1
        decoded.sort(key=lambda item: item[0])
        first = decoded[0][0] if decoded else None
        later = [seq for seq in self._pending if seq > start]
        if first is None and later:  # nothing replayed, yet batches after `start` exist: those are lost
            first = min(later)
        partial = first is not None and first > start
        if partial or self.next_seq is None:
            # Either the whole history from 0, or the engine no longer has what we missed: start
            # from an empty view at the first batch it has. Blocks stored before that are unknown
            # (a miss, never a false hit: their removals are ignored too).
            self._clear()
        position = first if first is not None else start
        for seq, events in decoded:
            if seq != position:
                break
            self._apply(events)
            position += 1
        self.next_seq = position
        self.replay_from = None
        self._drain_pending()
        if self.replay_from is None:
            self._set(EXACT, "caught up by replay" + (f" (history from {first})" if partial else ""))

    def disconnected(self) -> None:
        """The subscription lost its connection: what was missed, or whether the engine restarted, is unknown."""
        self._restart("event connection lost")

    # -- internals -------------------------------------------------------------------------------

    def _drain_pending(self) -> None:
        pending = self._pending
        position = self.next_seq
        assert position is not None
        for seq in sorted(pending):
            if seq < position:
                del pending[seq]
                continue
            if seq != position:
                self.replay_from = position  # still a hole: replay again
                self._set(DEGRADED, f"gap: expected {position}, got {seq}")
                return
            self._apply(pending.pop(seq))
            position += 1
        self.next_seq = position

    def _restart(self, why: str) -> None:
        self._clear()
        self._pending.clear()
        self.next_seq = None
        self.replay_from = 0
        self._set(DEGRADED, why)

    def _clear(self) -> None:
        self._keys.clear()
        self._held.clear()
        self._removed.clear()
        self.applied += 1
        self.cleared_at = self.applied

    def _set(self, state: str, why: str) -> None:
        old = self.state
        self.state, self.reason = state, why
        if old != state:
            self.on_state(self, old, why)

    def _apply(self, events: list[Event]) -> None:
        self.last_event_at = self.clock()
        self.applied += 1
        keys, held = self._keys, self._held
        for event in events:
            if isinstance(event, Stored):
                # A model whose hash blocks are smaller than its KV blocks also stores partial
                # blocks; the largest size seen is the whole block the request side cuts.
                self.block_size = max(self.block_size or 0, event.block_size)
                if event.parent is None:
                    key = 0
                else:
                    parent = keys.get(event.parent)
                    if parent is None:
                        self.unchained += len(event.block_hashes)
                        continue
                    key = parent
                size = event.block_size
                tokens = event.token_ids
                for i, engine_hash in enumerate(event.block_hashes):
                    key = chain_key(key, tokens[i * size:(i + 1) * size])
                    if keys.get(engine_hash) != key:
                        if engine_hash in keys:
                            self._drop(engine_hash)
                        keys[engine_hash] = key
                        held[key] = held.get(key, 0) + 1
            elif isinstance(event, Removed):
                for engine_hash in event.block_hashes:
                    if engine_hash in keys:
                        self._drop(engine_hash)
            else:
                self._clear()

    def _drop(self, engine_hash: Any) -> None:
        key = self._keys.pop(engine_hash)
        count = self._held.get(key, 0) - 1
        if count > 0:
            self._held[key] = count
            return
        self._held.pop(key, None)
        removed = self._removed
        removed.pop(key, None)  # re-inserted last: the dict's order is the removals' order
        removed[key] = self.applied
        if len(removed) > MAX_REMOVALS:
            for old in list(itertools.islice(removed, MAX_REMOVALS // 4)):
                del removed[old]
