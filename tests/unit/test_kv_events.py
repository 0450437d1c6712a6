"""The exact view of a server's prefix cache, fed in order, across gaps, replays, clears, restarts and garbage."""

from __future__ import annotations

import msgspec
import pytest

from pdproxy.mock_kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, word_token_id
from pdproxy.routing.kv_events import (
    DEGRADED,
    EXACT,
    FALLBACK,
    BadBatch,
    ServerCache,
    block_keys_of_tokens,
    decode_batch,
)

SIZE = 4
encode = msgspec.msgpack.Encoder().encode


def tokens(*words: str) -> list[int]:
    return [word_token_id(w) for w in words]


PROMPT = tokens(*"a b c d e f g h i j".split())  # two whole blocks and a partial one
KEYS = block_keys_of_tokens(PROMPT, SIZE)


def stored(hashes: list[int], parent: int | None, token_ids: list[int]) -> bytes:
    return encode(KVEventBatch(1.0, [BlockStored(hashes, parent, token_ids, SIZE, None, "GPU", None)], 0))


def removed(hashes: list[int]) -> bytes:
    return encode(KVEventBatch(1.0, [BlockRemoved(hashes, "GPU")], 0))


def caught_up(cache: ServerCache) -> ServerCache:
    cache.replayed([])  # a new view first replays the whole history: here there is none
    assert cache.state == EXACT and cache.next_seq == 0
    return cache


def test_in_order_events_make_an_exact_view_in_the_requests_keys() -> None:
    changes: list[tuple[str, str]] = []
    cache = ServerCache("p1", on_state=lambda c, old, why: changes.append((old, c.state)))
    assert cache.state == FALLBACK and cache.matched(KEYS) == 0
    caught_up(cache)
    cache.live(0, stored([101], None, PROMPT[:4]))
    cache.live(1, stored([102], 101, PROMPT[4:8]))  # chained on the engine's hash of its parent
    assert cache.matched(KEYS) == 2 and cache.block_size == SIZE
    cache.live(2, removed([102]))
    assert cache.matched(KEYS) == 1
    assert changes == [(FALLBACK, EXACT)]


def test_a_gap_degrades_until_the_replay_fills_it() -> None:
    cache = caught_up(ServerCache("p1"))
    first, second = stored([101], None, PROMPT[:4]), stored([102], 101, PROMPT[4:8])
    cache.live(0, first)
    cache.live(2, removed([101]))  # 1 was lost
    assert cache.state == DEGRADED and cache.replay_from == 1 and cache.matched(KEYS) == 0
    cache.replayed([(1, second), (2, removed([101]))])
    assert cache.state == EXACT and cache.next_seq == 3 and cache.replay_from is None
    assert cache.matched(KEYS) == 0 and cache.blocks() == 1  # 101 went; 102's key stays held


def test_replay_unavailable_falls_back_and_a_later_replay_recovers() -> None:
    cache = caught_up(ServerCache("p1"))
    cache.live(0, stored([101], None, PROMPT[:4]))
    cache.live(5, stored([102], 101, PROMPT[4:8]))
    cache.replayed(None)  # the replay socket did not answer
    assert cache.state == FALLBACK and cache.matched(KEYS) == 0 and cache.replay_from == 1
    cache.replayed([(3, removed([999])), (4, removed([998]))])  # the engine no longer has 1-2
    assert cache.state == EXACT and "history from 3" in cache.reason
    assert cache.matched(KEYS) == 0  # its view started empty: 101 is unknown, and 102 had no known parent
    assert cache.unchained == 1


def test_all_blocks_cleared_empties_the_view() -> None:
    cache = caught_up(ServerCache("p1"))
    cache.live(0, stored([101, 102], None, PROMPT[:8]))
    assert cache.matched(KEYS) == 2
    cache.live(1, encode(KVEventBatch(1.0, [AllBlocksCleared()], 0)))
    assert cache.state == EXACT and cache.blocks() == 0 and cache.matched(KEYS) == 0


def test_a_removal_after_a_mark_is_news_and_one_before_it_is_not() -> None:
    cache = caught_up(ServerCache("p1"))
    cache.live(0, stored([101, 102], None, PROMPT[:8]))
    cache.live(1, removed([102]))
    mark = cache.applied  # a policy sends the prompt here now, its second block included
    assert not cache.forgot_since(KEYS[1], mark)  # that removal was known when it decided
    cache.live(2, stored([103], 101, PROMPT[4:8]))  # the request re-stored it ...
    cache.live(3, removed([103]))  # ... and the engine evicted it again since
    assert cache.forgot_since(KEYS[1], mark) and not cache.forgot_since(KEYS[0], mark)
    later = cache.applied
    cache.live(4, encode(KVEventBatch(1.0, [AllBlocksCleared()], 0)))
    assert cache.forgot_since(KEYS[0], later)  # a cleared view forgot every block


def test_an_engine_restart_is_never_routed_on_stale_blocks() -> None:
    cache = caught_up(ServerCache("p1"))
    cache.live(0, stored([101, 102], None, PROMPT[:8]))
    cache.live(1, removed([7]))
    cache.live(0, stored([201], None, PROMPT[:4]))  # the sequence started again: a new engine
    assert cache.state == DEGRADED and cache.matched(KEYS) == 0 and cache.replay_from == 0
    cache.replayed([(0, stored([201], None, PROMPT[:4]))])
    assert cache.state == EXACT and cache.matched(KEYS) == 1  # only what the new engine holds


def test_a_lost_connection_starts_the_view_again() -> None:
    cache = caught_up(ServerCache("p1"))
    cache.live(0, stored([101], None, PROMPT[:4]))
    cache.disconnected()
    assert cache.state == DEGRADED and cache.blocks() == 0 and cache.replay_from == 0


@pytest.mark.parametrize("payload", [b"", b"\xc1", encode([1.0]), encode([1.0, "x"]), encode([1.0, [["Nope"]]]),
                                     encode([1.0, [["BlockStored", [1], None, [1, 2], 4, None, "GPU", None]]]),
                                     encode({"ts": 1.0}), encode([1.0, [[1, 2]]])])
def test_garbage_is_counted_and_changes_nothing(payload: bytes) -> None:
    with pytest.raises(BadBatch):
        decode_batch(payload)
    cache = caught_up(ServerCache("p1"))
    cache.live(0, stored([101], None, PROMPT[:4]))
    cache.live(1, payload)
    assert cache.garbage == 1 and cache.state == EXACT and cache.next_seq == 1 and cache.matched(KEYS) == 1


def test_the_array_form_and_bytes_hashes_decode_too() -> None:
    batch = encode([1.0, [["BlockStored", [b"\x01" * 32], None, PROMPT[:4], SIZE, None, "GPU", None]]])
    cache = caught_up(ServerCache("p1"))
    cache.live(0, batch)
    assert cache.matched(KEYS) == 1
