"""Load-balancing policies: shared contract tests over the registry, then the rules of least_conn,
round_robin and prefix_hash (cache_aware and least_tokens have their own files)."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from pdproxy.policies import (
    POLICIES,
    Balancer,
    CacheAware,
    LeastConn,
    LeastTokens,
    PolicyOptions,
    PrefixHash,
    RoundRobin,
    make_balancer,
)
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

VNODES = 40
LOAD_FACTOR = 0.25


@dataclass
class Req:
    """The smallest routing request: a fixed prompt."""

    text: str

    def prompt_prefix(self, limit: int) -> str:
        return self.text[:limit]


def ups(n: int, *, weights: Sequence[int] | None = None, port: int = 8100) -> list[Upstream]:
    weights = weights or [1] * n
    return [Upstream(Role.PREFILL, f"http://10.0.0.{i + 1}:{port}", weight=w) for i, w in enumerate(weights)]


def options(**changes: object) -> PolicyOptions:
    """Small test values; each test overrides what it is about.

    The contract prompts share no 16-character leading block (the hot one is shorter than a block),
    so for cache_aware they test its load balancing; its affinity rules have their own file.
    """
    values: dict[str, object] = {
        "prefix_chars": 64, "vnodes": VNODES, "load_factor": LOAD_FACTOR, "block_chars": 16,
        "index_max_blocks": 1024, "cache_weight": 1.0, "cache_load": "tokens", "chars_per_token": 4.0,
    }
    values.update(changes)
    return PolicyOptions(**values)  # type: ignore[arg-type]


def policy(name: str, *, seed: int = 0, prefix_chars: int = 64) -> Balancer:
    return make_balancer(name, options(prefix_chars=prefix_chars), rng=random.Random(seed))


def random_prompts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "prefill", "decode", "token", "the"]
    return [f"{i} " + " ".join(rng.choice(words) for _ in range(12)) for i in range(n)]


# ---------------------------------------------------------------- contract: every registered policy

ALL_POLICIES = sorted(POLICIES)


def test_registry_has_the_documented_policies() -> None:
    assert {"least_conn", "round_robin", "prefix_hash", "least_tokens", "cache_aware"} <= set(POLICIES)


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_single_candidate_is_always_chosen(name: str) -> None:
    balancer = policy(name)
    (only,) = ups(1)
    for prompt in random_prompts(30):
        only.in_flight = len(prompt) % 7
        assert balancer.choose([only], Req(prompt)) is only


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_never_returns_an_upstream_outside_the_candidates(name: str) -> None:
    balancer = policy(name)
    pool = ups(5, weights=[1, 2, 1, 3, 1])
    rng = random.Random(7)
    for prompt in random_prompts(300):
        for upstream in pool:
            upstream.in_flight = rng.randrange(0, 6)
        candidates = rng.sample(pool, rng.randrange(1, len(pool) + 1))
        chosen = balancer.choose(candidates, Req(prompt))
        assert any(chosen is c for c in candidates)


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_works_after_a_candidate_is_removed_between_calls(name: str) -> None:
    balancer = policy(name)
    a, b, c = ups(3)
    prompts = random_prompts(90)
    for prompt in prompts[:30]:
        balancer.choose([a, b, c], Req(prompt))
    seen: Counter[str] = Counter()
    for prompt in prompts[30:]:
        chosen = balancer.choose([a, c], Req(prompt))
        assert chosen is a or chosen is c
        seen[chosen.url] += 1
    assert set(seen) == {a.url, c.url}  # both survivors keep getting traffic
    # and the removed one comes back into rotation when re-added
    back = Counter(balancer.choose([a, b, c], Req(p)).url for p in prompts)
    assert b.url in back


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_every_idle_candidate_gets_traffic(name: str) -> None:
    balancer = policy(name)
    pool = ups(4)
    seen = Counter(balancer.choose(pool, Req(p)).url for p in random_prompts(120))
    assert set(seen) == {u.url for u in pool}


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_leases_held_keep_the_load_bounded(name: str) -> None:
    """Requests that stay in flight (a lease per choice) never pile onto one upstream beyond the bound."""
    balancer = policy(name)
    pool = ups(4)
    for i in range(40):
        total = sum(u.in_flight for u in pool)
        chosen = balancer.choose(pool, Req("same hot prompt" if i % 2 else f"prompt {i}"))
        bound = math.ceil((1 + LOAD_FACTOR) * (total + 1) / len(pool))
        assert chosen.in_flight + 1 <= bound
        chosen.in_flight += 1


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_policies_do_not_change_upstream_state(name: str) -> None:
    balancer = policy(name)
    pool = ups(3, weights=[1, 2, 3])
    for i, u in enumerate(pool):
        u.in_flight = i
    before = [(u.in_flight, u.served, u.weight, u.state) for u in pool]
    for prompt in random_prompts(20):
        balancer.choose(pool, Req(prompt))
    assert [(u.in_flight, u.served, u.weight, u.state) for u in pool] == before


def test_make_balancer_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        policy("fastest")
    message = str(info.value)
    assert "fastest" in message
    for name in POLICIES:
        assert name in message


@pytest.mark.parametrize(("name", "cls"), [("least_conn", LeastConn), ("round_robin", RoundRobin),
                                           ("prefix_hash", PrefixHash), ("least_tokens", LeastTokens),
                                           ("cache_aware", CacheAware)])
def test_make_balancer_builds_the_named_class(name: str, cls: type) -> None:
    assert isinstance(policy(name), cls)


# ---------------------------------------------------------------- LeastConn


def test_least_conn_picks_fewest_in_flight() -> None:
    a, b, c = ups(3)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    for seed in range(10):
        assert LeastConn(random.Random(seed)).choose([a, b, c], Req("x")) is b


def test_least_conn_uses_in_flight_per_weight() -> None:
    heavy, light = ups(2, weights=[2, 1])
    balancer = LeastConn(random.Random(0))
    heavy.in_flight, light.in_flight = 1, 1  # 0.5 vs 1.0
    assert balancer.choose([heavy, light], Req("x")) is heavy
    heavy.in_flight, light.in_flight = 3, 1  # 1.5 vs 1.0
    assert balancer.choose([heavy, light], Req("x")) is light
    heavy.in_flight, light.in_flight = 1, 0  # 0.5 vs 0.0
    assert balancer.choose([heavy, light], Req("x")) is light
    heavy.in_flight, light.in_flight = 2, 1  # 1.0 vs 1.0: a tie, both get picked
    seen = {balancer.choose([heavy, light], Req("x")).url for _ in range(50)}
    assert seen == {heavy.url, light.url}


def test_least_conn_breaks_ties_with_the_injected_rng() -> None:
    pool = ups(3)
    pool[2].in_flight = 1  # not part of the tie

    def run(seed: int) -> list[str]:
        balancer = LeastConn(random.Random(seed))
        return [balancer.choose(pool, Req("x")).url for _ in range(60)]

    first = run(1)
    assert set(first) == {pool[0].url, pool[1].url}  # with equal load both tied upstreams are chosen
    assert run(1) == first  # same seed, same choices
    assert run(2) != first  # another seed, other choices


def test_least_conn_follows_leases() -> None:
    pool = ups(3)
    balancer = LeastConn(random.Random(3))
    for _ in range(30):
        balancer.choose(pool, Req("x")).in_flight += 1
    assert [u.in_flight for u in pool] == [10, 10, 10]


# ---------------------------------------------------------------- RoundRobin


def test_round_robin_rotates_evenly() -> None:
    pool = ups(3)
    balancer = RoundRobin()
    picks = [balancer.choose(pool, Req("x")).url for _ in range(30)]
    for start in range(0, 30, 3):
        assert sorted(picks[start:start + 3]) == sorted(u.url for u in pool)
    assert all(picks[i] != picks[i + 1] for i in range(len(picks) - 1))


def test_round_robin_weights_3_to_1_are_smooth() -> None:
    heavy, light = ups(2, weights=[3, 1])
    balancer = RoundRobin()
    picks = ["H" if balancer.choose([heavy, light], Req("x")) is heavy else "L" for _ in range(8)]
    assert Counter(picks) == {"H": 6, "L": 2}
    assert "LL" not in "".join(picks)
    for start in range(0, 8, 4):  # every cycle of 4 holds exactly one light pick
        assert picks[start:start + 4].count("L") == 1


def test_round_robin_matches_nginx_smooth_sequence() -> None:
    """nginx documents weights a=5, b=1, c=1 as the sequence a a b a c a a."""
    a, b, c = ups(3, weights=[5, 1, 1])
    balancer = RoundRobin()
    names = {a.url: "a", b.url: "b", c.url: "c"}
    picks = "".join(names[balancer.choose([a, b, c], Req("x")).url] for _ in range(14))
    assert picks == "aabacaa" * 2


def test_round_robin_after_removal_alternates_between_survivors() -> None:
    a, b, c = ups(3)
    balancer = RoundRobin()
    for _ in range(4):
        balancer.choose([a, b, c], Req("x"))
    picks = [balancer.choose([a, c], Req("x")).url for _ in range(100)]
    counts = Counter(picks)
    assert set(counts) == {a.url, c.url}
    assert abs(counts[a.url] - counts[c.url]) <= 2  # credit left from before the removal is a bounded skew
    assert all(picks[i] != picks[i + 1] for i in range(2, len(picks) - 1))  # then strict alternation


def test_round_robin_many_membership_changes_stay_fair() -> None:
    """Upstreams come and go (stale state is forgotten); the current members still share evenly."""
    balancer = RoundRobin()
    for generation in range(30):
        balancer.choose(ups(3, port=9000 + generation), Req("x"))
    pool = ups(2)
    assert Counter(balancer.choose(pool, Req("x")).url for _ in range(20)) == {pool[0].url: 10, pool[1].url: 10}


# ---------------------------------------------------------------- PrefixHash


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def ring_order(pool: Sequence[Upstream], prompt: str, vnodes: int = VNODES, prefix_chars: int = 64) -> list[Upstream]:
    """The distinct upstreams met walking the ring clockwise from the prompt's key (reimplemented independently)."""
    key = prompt[:prefix_chars]
    points = sorted((_h(f"{u.url}#{i}"), n) for n, u in enumerate(pool) for i in range(vnodes * u.weight))
    start = next((i for i, (p, _) in enumerate(points) if p > _h(key)), 0)
    order: list[Upstream] = []
    for step in range(len(points)):
        owner = pool[points[(start + step) % len(points)][1]]
        if owner not in order:
            order.append(owner)
    return order


def prefix_hash(prefix_chars: int = 64, load_factor: float = LOAD_FACTOR) -> PrefixHash:
    return PrefixHash(prefix_chars, VNODES, load_factor)


def test_prefix_hash_idle_choice_is_the_first_owner_on_the_ring() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    for prompt in random_prompts(50):
        assert balancer.choose(pool, Req(prompt)) is ring_order(pool, prompt, VNODES)[0]


def test_prefix_hash_same_prefix_same_upstream() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    other = prefix_hash()
    for prompt in random_prompts(40):
        first = balancer.choose(pool, Req(prompt))
        assert all(balancer.choose(pool, Req(prompt)) is first for _ in range(3))
        assert other.choose(pool, Req(prompt)) is first  # a fresh instance (another proxy) agrees
        assert balancer.choose(list(reversed(pool)), Req(prompt)) is first  # order of candidates is irrelevant


def test_prefix_hash_spreads_different_prefixes_over_all_upstreams() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    counts = Counter(balancer.choose(pool, Req(p)).url for p in random_prompts(200))
    assert set(counts) == {u.url for u in pool}
    assert min(counts.values()) > 20, counts


def test_prefix_hash_only_the_first_prefix_chars_matter() -> None:
    pool = ups(4)
    balancer = prefix_hash(prefix_chars=16)
    head = "system: be nice"  # 15 chars; the 16th varies below
    same = {balancer.choose(pool, Req(head + "!" + tail)).url for tail in random_prompts(40)}
    assert len(same) == 1
    differing = {balancer.choose(pool, Req(f"{i:04d}" + head + "!")).url for i in range(40)}
    assert len(differing) > 1


def test_prefix_hash_with_a_proxy_request() -> None:
    pool = ups(4)
    balancer = prefix_hash(prefix_chars=40)
    system = {"role": "system", "content": "You are a helpful assistant for the docs."}

    def chat(question: str) -> ProxyRequest:
        body = {"model": "m", "messages": [system, {"role": "user", "content": question}]}
        return ProxyRequest("/v1/chat/completions", body, False, "r", {})

    chosen = {balancer.choose(pool, chat(q)).url for q in random_prompts(20)}
    assert len(chosen) == 1  # the shared system prompt fills the first 40 characters


def test_prefix_hash_skips_an_overloaded_owner_for_the_next_on_the_ring() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    for prompt in random_prompts(20):
        order = ring_order(pool, prompt, VNODES)
        for u in pool:
            u.in_flight = 0
        order[0].in_flight = 5  # total 6 -> capacity ceil(1.25 * 6 / 4) = 2
        assert balancer.choose(pool, Req(prompt)) is order[1]
        order[1].in_flight = 5  # total 11 -> capacity ceil(1.25 * 11 / 4) = 4
        assert balancer.choose(pool, Req(prompt)) is order[2]
        order[0].in_flight = order[1].in_flight = 1  # total 3 -> capacity 1: 1 + 1 > 1
        assert balancer.choose(pool, Req(prompt)) is order[2]
        order[0].in_flight = 0  # total 2 -> capacity 1: 0 + 1 <= 1
        assert balancer.choose(pool, Req(prompt)) is order[0]


@pytest.mark.parametrize(("owner_load", "other_load", "stays"), [
    (0, 0, True),    # total 1: cap ceil(0.625)=1, 0+1 <= 1
    (1, 0, True),    # total 2: cap ceil(1.25)=2, 1+1 <= 2
    (2, 0, False),   # total 3: cap ceil(1.875)=2, 2+1 > 2
    (3, 2, True),    # total 6: cap ceil(3.75)=4, 3+1 <= 4
    (4, 2, True),    # total 7: cap ceil(4.375)=5, 4+1 <= 5
    (5, 2, False),   # total 8: cap ceil(5.0)=5, 5+1 > 5
    (11, 6, True),   # total 18: cap ceil(11.25)=12, 11+1 <= 12
    (12, 6, False),  # total 19: cap ceil(11.875)=12, 12+1 > 12
])
def test_prefix_hash_capacity_formula(owner_load: int, other_load: int, stays: bool) -> None:
    pool = ups(2)
    prompt = "boundary"
    owner, other = ring_order(pool, prompt, VNODES)
    owner.in_flight, other.in_flight = owner_load, other_load
    capacity = math.ceil((1 + LOAD_FACTOR) * (owner_load + other_load + 1) * owner.weight / 2)
    assert (owner_load + 1 <= capacity) is stays  # the table above agrees with the formula
    assert (prefix_hash().choose(pool, Req(prompt)) is owner) is stays
    assert (prefix_hash().choose(pool, Req(prompt)) is other) is not stays


def test_prefix_hash_capacity_uses_weights() -> None:
    heavy, light = ups(2, weights=[3, 1])
    balancer = prefix_hash()
    prompt = next(p for p in random_prompts(200) if ring_order([heavy, light], p, VNODES)[0] is heavy)
    heavy.in_flight, light.in_flight = 6, 1  # total 8: heavy cap ceil(1.25*8*3/4)=8, 6+1 <= 8
    assert balancer.choose([heavy, light], Req(prompt)) is heavy
    heavy.in_flight = 8  # total 10: heavy cap ceil(9.375)=10, 8+1 <= 10
    assert balancer.choose([heavy, light], Req(prompt)) is heavy
    heavy.in_flight = 10  # total 12: heavy cap ceil(11.25)=12, 10+1 <= 12
    assert balancer.choose([heavy, light], Req(prompt)) is heavy
    heavy.in_flight = 15  # total 17: heavy cap ceil(15.9375)=16, 15+1 <= 16
    assert balancer.choose([heavy, light], Req(prompt)) is heavy
    light.in_flight = 0  # total 16: heavy cap ceil(15)=15, 15+1 > 15
    assert balancer.choose([heavy, light], Req(prompt)) is light


def test_prefix_hash_hot_prefix_spills_within_the_bound() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    for _ in range(60):
        total = sum(u.in_flight for u in pool)
        chosen = balancer.choose(pool, Req("one very hot prompt"))
        assert chosen.in_flight + 1 <= math.ceil((1 + LOAD_FACTOR) * (total + 1) / 4)
        chosen.in_flight += 1
    assert max(u.in_flight for u in pool) <= math.ceil(1.25 * 60 / 4)
    assert min(u.in_flight for u in pool) > 0


def test_prefix_hash_removal_moves_only_the_removed_upstreams_keys() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    prompts = random_prompts(400)
    before = {p: balancer.choose(pool, Req(p)) for p in prompts}
    gone = pool[2]
    survivors = [u for u in pool if u is not gone]
    after = {p: balancer.choose(survivors, Req(p)) for p in prompts}
    moved = [p for p in prompts if after[p] is not before[p]]
    assert moved, "the removed upstream owned no keys"
    assert all(before[p] is gone for p in moved)
    assert all(after[p] is not gone for p in prompts)
    # the removed upstream's keys spread over the survivors rather than all landing on one
    assert len({after[p].url for p in moved}) > 1
    # adding it back restores the original mapping
    assert {p: balancer.choose(pool, Req(p)) for p in prompts} == before


def test_prefix_hash_adding_an_upstream_moves_keys_only_to_it() -> None:
    pool = ups(4)
    balancer = prefix_hash()
    prompts = random_prompts(400)
    before = {p: balancer.choose(pool[:3], Req(p)) for p in prompts}
    after = {p: balancer.choose(pool, Req(p)) for p in prompts}
    moved = [p for p in prompts if after[p] is not before[p]]
    assert moved
    assert all(after[p] is pool[3] for p in moved)


def test_prefix_hash_weight_two_gets_about_twice_the_keys() -> None:
    heavy, light = ups(2, weights=[2, 1])
    balancer = PrefixHash(64, 160, LOAD_FACTOR)
    counts = Counter(balancer.choose([heavy, light], Req(p)).url for p in random_prompts(3000))
    ratio = counts[heavy.url] / counts[light.url]
    assert 1.6 < ratio < 2.5, counts
    light.weight = 2  # a weight change rebuilds the ring
    counts = Counter(balancer.choose([heavy, light], Req(p)).url for p in random_prompts(3000))
    ratio = counts[heavy.url] / counts[light.url]
    assert 0.75 < ratio < 1.33, counts
