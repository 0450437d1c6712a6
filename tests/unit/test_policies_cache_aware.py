"""cache_aware: its prefix index, its cost, and the token estimates it uses (injected clock and rng)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from pdproxy.policies import CacheAware, PolicyOptions, make_balancer
from pdproxy.policies.prefix_index import PrefixIndex, block_keys
from pdproxy.policies.tokens import CharTokenCounter, TokenizerCounter, make_token_counter
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream, UpstreamPool

BLOCK = 8  # characters per block: small, so short test prompts span many blocks


@dataclass
class Req:
    text: str

    def prompt_prefix(self, limit: int) -> str:
        return self.text[:limit]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ups(n: int, *, weights: list[int] | None = None) -> list[Upstream]:
    weights = weights or [1] * n
    return [Upstream(Role.PREFILL, f"http://10.0.0.{i + 1}:8100", weight=w) for i, w in enumerate(weights)]


def cache_aware(*, weight: float = 1.0, load: str = "tokens", max_blocks: int = 1000, seed: int = 0,
                clock: Clock | None = None, block: int = BLOCK, chars_per_token: float = 1.0) -> CacheAware:
    """One token per character by default, so the numbers in the tests are easy to follow."""
    return CacheAware(rng=random.Random(seed), clock=clock or Clock(), counter=CharTokenCounter(chars_per_token),
                      block_chars=block, max_blocks=max_blocks, weight=weight, load=load)


def text(tag: str, chars: int) -> str:
    """A deterministic text of exactly `chars` characters that starts with `tag`."""
    body = (tag + " ") * (chars // (len(tag) + 1) + 1)
    return body[:chars]


def lease(chosen: Upstream) -> Upstream:
    chosen.in_flight += 1  # what the flow's Lease does
    return chosen


# ---------------------------------------------------------------- block keys and the index


def test_block_keys_chain_over_whole_blocks_only() -> None:
    keys = block_keys("a" * 8 + "b" * 8 + "c" * 5, 8)
    assert len(keys) == 2  # the trailing 5 characters form no block
    assert block_keys("a" * 8 + "b" * 8 + "zzzz", 8) == keys
    assert block_keys("x" + "a" * 7 + "b" * 8, 8)[1] != keys[1]  # a key covers the whole prefix, not its block
    assert block_keys("", 8) == [] and block_keys("short", 8) == []


def test_index_matches_the_leading_blocks_held() -> None:
    index = PrefixIndex(100, clock=Clock(), forget_after=60)
    first = block_keys(text("doc", 80), BLOCK)
    index.insert("s1", first)
    assert index.matched("s1", first) == 10
    longer = block_keys(text("doc", 80) + text("more", 40), BLOCK)
    assert index.matched("s1", longer) == 10
    other = block_keys(text("other", 80), BLOCK)
    assert index.matched("s1", other) == 0
    assert index.matched("s2", first) == 0


def test_index_lru_evicts_the_ends_of_old_prompts_first() -> None:
    index = PrefixIndex(12, clock=Clock(), forget_after=60)
    old = block_keys(text("old", 80), BLOCK)  # 10 blocks
    index.insert("s1", old)
    new = block_keys(text("new", 32), BLOCK)  # 4 more: 2 of old's go, from its end
    index.insert("s1", new)
    assert index.size("s1") == 12
    assert index.matched("s1", old) == 8
    assert index.matched("s1", new) == 4
    index.insert("s1", old[:3])  # touching a prefix makes it recent
    index.insert("s1", block_keys(text("third", 56), BLOCK))  # 7 blocks: 7 evicted, oldest first
    assert index.matched("s1", old) == 3
    assert index.matched("s1", new) == 2  # its last two blocks were older than old's first three


def test_index_binary_search_agrees_with_a_linear_scan() -> None:
    rng = random.Random(5)
    index = PrefixIndex(60, clock=Clock(), forget_after=60)
    prompts = [block_keys(text(f"p{rng.randrange(6)}", rng.randrange(8, 200)), BLOCK) for _ in range(300)]
    for i, keys in enumerate(prompts):
        index.insert("s", keys)
        probe = prompts[rng.randrange(i + 1)]
        blocks = index._blocks["s"]
        linear = next((n for n, key in enumerate(probe) if key not in blocks), len(probe))
        assert index.matched("s", probe) == linear
        assert all(key in blocks for key in probe[:linear])  # what is held is always a prefix


# ---------------------------------------------------------------- affinity


def test_same_prefix_goes_back_to_the_same_server() -> None:
    pool = ups(4)
    balancer = cache_aware()
    homes = {}
    for group in range(8):
        homes[group] = lease(balancer.choose(pool, Req(text(f"group{group}", 400) + " question 0")))
    for round_ in range(1, 4):
        for group in range(8):
            chosen = balancer.choose(pool, Req(text(f"group{group}", 400) + f" question {round_}"))
            assert chosen is homes[group]
            lease(chosen)


def test_cold_groups_spread_by_load() -> None:
    pool = ups(4)
    balancer = cache_aware()
    homes = [lease(balancer.choose(pool, Req(text(f"group{g}", 400)))) for g in range(4)]
    assert len({u.url for u in homes}) == 4  # each new prefix went to the least loaded server


def test_a_burst_sees_its_own_decisions() -> None:
    """The index is updated at decision time: the second request of a burst finds the first's prefix."""
    pool = ups(3)
    balancer = cache_aware(weight=2.0)
    prompt = text("shared document", 800)
    first = lease(balancer.choose(pool, Req(prompt + " q1")))
    assert balancer.matched_blocks(first, Req(prompt)) == 100  # nothing has completed yet
    second = balancer.choose(pool, Req(prompt + " q2"))
    assert second is first  # 2 × 3 + 803 queued < 2 × 803 anywhere else


def test_chat_routes_on_the_whole_conversation() -> None:
    """Conversations sharing a system prompt are told apart by their later messages."""
    pool = ups(4)
    balancer = cache_aware(block=16)
    system = {"role": "system", "content": text("You are a helpful assistant.", 600)}

    def chat(messages: list[dict[str, Any]]) -> ProxyRequest:
        return ProxyRequest("/v1/chat/completions", {"model": "m", "messages": messages}, False, "r", {})

    histories: dict[int, list[dict[str, Any]]] = {}
    homes: dict[int, Upstream] = {}
    for c in range(4):
        histories[c] = [system, {"role": "user", "content": text(f"conversation {c} opens", 300)}]
        homes[c] = lease(balancer.choose(pool, chat(histories[c])))
    assert len({u.url for u in homes.values()}) == 4  # same system prompt, yet spread
    for turn in range(3):
        for c in range(4):
            histories[c] += [{"role": "assistant", "content": text(f"reply {c}.{turn}", 200)},
                             {"role": "user", "content": text(f"follow-up {c}.{turn}", 100)}]
            request = chat(histories[c])
            assert balancer.matched_blocks(homes[c], request) > 50  # the whole history before the new turn
            assert balancer.choose(pool, request) is homes[c]
            lease(homes[c])


def test_whole_conversation_rendering_reaches_the_last_message() -> None:
    messages = [{"role": "system", "content": "s" * 3000}] + [
        {"role": "user" if i % 2 else "assistant", "content": f"message {i}"} for i in range(40)]
    request = ProxyRequest("/v1/chat/completions", {"messages": messages}, False, "r", {})
    rendered = request.prompt_prefix(1 << 62)
    assert rendered.startswith("system\n" + "s" * 3000)
    assert rendered.endswith("message 39\n") and "user\nmessage 1\n" in rendered
    changed = ProxyRequest("/v1/chat/completions", {"messages": [*messages[:-1], {"role": "user", "content": "x"}]},
                           False, "r", {})
    keys, other = block_keys(rendered, BLOCK), block_keys(changed.prompt_prefix(1 << 62), BLOCK)
    assert keys[:-2] == other[:len(keys) - 2] and keys[-1] not in other  # only the end differs


# ---------------------------------------------------------------- the cost


def test_long_match_with_long_queue_loses_to_an_idle_server() -> None:
    """cost = w × uncached + load: queued work beyond the recomputation sends the request elsewhere."""
    home, idle = ups(2)
    balancer = cache_aware()  # tokens load, w = 1, one token per character
    prompt = text("long shared prefix", 1000)
    lease(balancer.choose([home], Req(prompt + " q0")))  # home computes the prefix: 1003 tokens of work
    home.in_flight = 0  # ... and is done
    for i in range(5):  # a queue of short requests: 5 × 12 tokens of work
        lease(balancer.choose([home], Req(f"short one {i}")))
    # home: 3 uncached + 60 queued = 63; idle: 1003 uncached. The match wins.
    assert balancer.choose([home, idle], Req(prompt + " q1")) is home
    lease(home)
    lease(balancer.choose([home], Req(text("another long document", 1000))))  # 1000 more tokens queued on home
    # home: 3 + 60 + 3 + 1000 = 1066; idle: 1003. The queue costs more than recomputing: idle wins.
    assert balancer.choose([home, idle], Req(prompt + " q2")) is idle


@pytest.mark.parametrize(("w", "expected"), [(1.0, "idle"), (2.0, "home")])
def test_higher_w_holds_on_to_the_match_longer(w: float, expected: str) -> None:
    home, idle = ups(2)
    balancer = cache_aware(weight=w)
    prompt = text("long shared prefix", 1000)
    balancer.choose([home], Req(prompt + " q0"))  # home holds the prefix (that prefill is done)
    lease(balancer.choose([home], Req(text("another long document", 1200))))  # 1200 tokens queued on home
    # w = 1: home 3 + 1200 > idle 1003.  w = 2: home 6 + 1200 < idle 2006.
    chosen = balancer.choose([home, idle], Req(prompt + " q1"))
    assert chosen is (home if expected == "home" else idle)


@pytest.mark.parametrize(("queued", "expected"), [(3, "home"), (9, "home"), (11, "idle"), (30, "idle")])
def test_requests_load_trades_queue_length_against_recomputation(queued: int, expected: str) -> None:
    """With load = requests and w = 0.01, 1000 uncached tokens cost as much as 10 queued requests."""
    home, idle = ups(2)
    balancer = cache_aware(load="requests", weight=0.01)
    prompt = text("document", 1000)
    balancer.choose([home], Req(prompt))
    home.in_flight = queued
    chosen = balancer.choose([home, idle], Req(prompt + "!"))
    assert chosen is (home if expected == "home" else idle)


def test_weight_divides_the_cost() -> None:
    big, small = ups(2, weights=[3, 1])
    balancer = cache_aware(load="requests", weight=0.0)  # pure load: in-flight per unit of weight
    big.in_flight, small.in_flight = 2, 1  # 0.67 vs 1
    assert balancer.choose([big, small], Req("x")) is big
    big.in_flight = 4  # 1.33 vs 1
    assert balancer.choose([big, small], Req("x")) is small


def test_ties_are_broken_by_the_injected_rng() -> None:
    pool = ups(4)

    def run(seed: int) -> list[str]:
        balancer = cache_aware(seed=seed)
        return [balancer.choose(pool, Req(f"c{i}")).url for i in range(40)]  # shorter than a block: ties

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert set(run(3)) == {u.url for u in pool}


def test_tokens_load_is_released_with_the_leases() -> None:
    """The in-flight work the policy assigned is forgotten as the leases come back."""
    home, other = ups(2)
    balancer = cache_aware()
    prompt = text("doc", 1000)
    lease(balancer.choose([home], Req(prompt)))
    lease(balancer.choose([home], Req(text("other doc", 1000))))
    assert lease(balancer.choose([home, other], Req(prompt + "?"))) is other  # 2000 tokens queued on home
    # Both now hold the prefix; other is computing it (1001 tokens), home's two prefills are done.
    home.in_flight = 0
    assert balancer.choose([home, other], Req(prompt + "!")) is home


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="load"):
        cache_aware(load="latency")
    with pytest.raises(ValueError, match="weight"):
        cache_aware(weight=-1)


# ---------------------------------------------------------------- caps, removal, eviction


def test_a_full_server_is_never_offered_and_keeps_its_index() -> None:
    """Caps hold by construction: the pool offers only servers under their cap."""
    home, other = ups(2)
    home.max_in_flight = other.max_in_flight = 1
    pool = UpstreamPool(Role.PREFILL, [home, other])
    clock = Clock()
    balancer = cache_aware(clock=clock)
    prompt = text("document", 600)
    first = lease(balancer.choose(pool.available(), Req(prompt)))
    assert pool.available() == [o for o in (home, other) if o is not first]
    second = balancer.choose(pool.available(), Req(prompt + "?"))
    assert second is not first  # the only candidate; the full one was not offered
    first.in_flight = 0
    clock.now += 5  # briefly skipped (full): its index survives
    assert balancer.choose(pool.available(), Req(prompt + "!")) in (first, second)
    assert balancer.indexed_blocks(first) > 0


def test_a_removed_server_is_forgotten_and_a_readded_one_starts_cold() -> None:
    a, b, c = ups(3)
    clock = Clock()
    balancer = cache_aware(clock=clock)
    prompt = text("document", 600)
    home = balancer.choose([a, b, c], Req(prompt))
    assert balancer.indexed_blocks(home) == 75
    survivors = [u for u in (a, b, c) if u is not home]
    balancer.choose(survivors, Req("x"))
    clock.now += 30
    balancer.choose(survivors, Req("x"))
    assert balancer.indexed_blocks(home) == 75  # absent for 30 s: maybe only ejected for a moment
    clock.now += 60
    balancer.choose(survivors, Req("x"))
    assert balancer.indexed_blocks(home) == 0  # absent past FORGET_AFTER: dropped
    readded = Upstream(Role.PREFILL, home.url)  # runtime membership builds a new Upstream: a new id
    assert balancer.matched_blocks(readded, Req(prompt)) == 0


def test_readded_upstream_object_starts_cold_at_once() -> None:
    a, b = ups(2)
    balancer = cache_aware()
    prompt = text("document", 600)
    home = balancer.choose([a, b], Req(prompt))
    fresh = Upstream(Role.PREFILL, home.url)  # removed, then added again: same url, new upstream
    assert balancer.matched_blocks(home, Req(prompt)) == 75
    assert balancer.matched_blocks(fresh, Req(prompt)) == 0


def test_eviction_bounds_memory_and_loses_affinity() -> None:
    a, b = ups(2)
    balancer = cache_aware(max_blocks=50)
    prompt = text("document", 300)  # 37 blocks
    home = lease(balancer.choose([a, b], Req(prompt)))
    home.in_flight = 0
    for i in range(4):
        balancer.choose([home], Req(text(f"filler {i}", 300)))  # pushes the document out of home's index
    assert balancer.indexed_blocks(home) == 50
    assert balancer.matched_blocks(home, Req(prompt)) == 0


# ---------------------------------------------------------------- token estimates and the registry


def test_char_estimate() -> None:
    assert CharTokenCounter(4.0).count("a" * 9) == 3
    assert CharTokenCounter(4.0).count("") == 0
    with pytest.raises(ValueError):
        CharTokenCounter(0)


def test_a_tokenizer_counter_counts_with_it() -> None:
    class Encoding:
        def __init__(self, n: int) -> None:
            self.ids = list(range(n))

    class FakeTokenizer:
        def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
            return Encoding(len(text.split()))

    counter = TokenizerCounter(FakeTokenizer())
    assert counter.count("three short words") == 3


def test_missing_tokenizers_library_or_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Any) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tokenizers(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tokenizers":
            raise ImportError("no tokenizers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ValueError, match=r"pip install 'pdproxy\[tokenizer\]'"):
        make_token_counter(str(tmp_path / "tokenizer.json"), 4.0)
    monkeypatch.undo()
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="cannot load tokenizer file"):
        make_token_counter(str(tmp_path / "missing.json"), 4.0)


def test_a_local_tokenizer_file_counts_real_tokens(tmp_path: Any) -> None:
    """A tokenizer.json built here (no download): one token per known word, [UNK] for the rest."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    counter = make_token_counter(str(path), 4.0)
    assert counter.count("hello world and more") == 4
    balancer = make_balancer("least_tokens", PolicyOptions(
        prefix_chars=64, vnodes=10, load_factor=0.25, block_chars=16, index_max_blocks=100, cache_weight=2.0,
        cache_load="tokens", chars_per_token=4.0, tokenizer=str(path)), rng=random.Random(0))
    a = ups(1)[0]
    a.in_flight = 1
    balancer.choose([a], Req("hello " * 10))
    assert balancer.in_flight_tokens(a) == 10  # type: ignore[attr-defined]


def test_registry_builds_cache_aware_from_options() -> None:
    options = PolicyOptions(prefix_chars=64, vnodes=10, load_factor=0.25, block_chars=16, index_max_blocks=100,
                            cache_weight=0.5, cache_load="requests", chars_per_token=4.0)
    balancer = make_balancer("cache_aware", options, rng=random.Random(0), clock=Clock())
    assert isinstance(balancer, CacheAware)
    with pytest.raises(ValueError, match="load"):
        make_balancer("cache_aware", PolicyOptions(**{**_fields(options), "cache_load": "bytes"}),
                      rng=random.Random(0))


def _fields(options: PolicyOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in options.__slots__}


def test_a_hot_shared_prefix_does_not_pile_everything_onto_one_server() -> None:
    """Many requests with the same long prefix: the queue cost spreads them once it outweighs recomputation."""
    pool = ups(4)
    balancer = cache_aware()
    prompt = text("system prompt everyone shares", 2000)
    for i in range(40):
        lease(balancer.choose(pool, Req(prompt + f" user {i}")))
    counts = Counter(u.in_flight for u in pool)
    assert all(u.in_flight >= 5 for u in pool), counts
