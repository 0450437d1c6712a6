"""least_tokens and its ledger: in-flight prompt tokens reconciled with the lease counts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdproxy.policies import LeastTokens
from pdproxy.policies.ledger import SWEEP_EVERY, InFlightTokens
from pdproxy.policies.tokens import CharTokenCounter
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Lease, Role, Upstream


@dataclass
class Req:
    text: str

    def prompt_prefix(self, limit: int) -> str:
        return self.text[:limit]


def ups(n: int, *, weights: list[int] | None = None) -> list[Upstream]:
    weights = weights or [1] * n
    return [Upstream(Role.PREFILL, f"http://10.0.0.{i + 1}:8100", weight=w) for i, w in enumerate(weights)]


def least_tokens(seed: int = 0) -> LeastTokens:
    return LeastTokens(random.Random(seed), CharTokenCounter(1.0))  # one token per character


def test_fewer_tokens_beat_fewer_requests() -> None:
    a, b = ups(2)
    balancer = least_tokens()
    long_one = Lease(balancer.choose([a], Req("x" * 5000)))
    shorts = [Lease(balancer.choose([b], Req("y" * 100))) for _ in range(3)]
    assert (a.in_flight, b.in_flight) == (1, 3)
    assert balancer.choose([a, b], Req("z" * 100)) is b  # 300 + 100 tokens < 5000 + 100, despite 3 requests
    for item in [long_one, *shorts]:
        item.release()


def test_released_leases_release_their_tokens_oldest_first() -> None:
    a, b = ups(2)
    balancer = least_tokens()
    first = Lease(balancer.choose([a], Req("x" * 5000)))
    second = Lease(balancer.choose([a], Req("x" * 10)))
    Lease(balancer.choose([b], Req("y" * 1000)))
    assert balancer.in_flight_tokens(a) == 5010
    first.release()  # finished first, as an FCFS prefill scheduler runs them
    assert balancer.in_flight_tokens(a) == 10
    assert balancer.choose([a, b], Req("z")) is a
    second.release()
    assert balancer.in_flight_tokens(a) == 0


def test_out_of_order_completion_self_corrects_when_the_queue_drains() -> None:
    a = ups(1)[0]
    balancer = least_tokens()
    big = Lease(balancer.choose([a], Req("x" * 5000)))
    small = Lease(balancer.choose([a], Req("x" * 10)))
    small.release()  # the small one finished first: the ledger drops the oldest entry instead
    assert balancer.in_flight_tokens(a) == 10  # the count is right, the size briefly wrong
    big.release()
    assert balancer.in_flight_tokens(a) == 0


def test_weights_scale_the_load() -> None:
    big, small = ups(2, weights=[4, 1])
    balancer = least_tokens()
    Lease(balancer.choose([big], Req("x" * 200)))
    assert balancer.choose([big, small], Req("y" * 100)) is big  # (200 + 100) / 4 = 75 < 100 / 1
    Lease(balancer.choose([big], Req("x" * 200)))
    assert balancer.choose([big, small], Req("y" * 100)) is small  # (400 + 100) / 4 = 125 > 100


def test_ties_go_to_fewer_requests_then_to_the_rng() -> None:
    a, b = ups(2)
    balancer = least_tokens()
    Lease(balancer.choose([a], Req("x" * 50)))
    Lease(balancer.choose([b], Req("x" * 25)))
    Lease(balancer.choose([b], Req("x" * 25)))
    assert balancer.choose([a, b], Req("q")) is a  # 50 tokens each; a has one request, b two
    seen = {least_tokens(seed).choose(ups(3), Req("q")).url for seed in range(20)}
    assert len(seen) == 3


def test_chat_counts_the_whole_conversation() -> None:
    a = ups(1)[0]
    balancer = least_tokens()
    messages = [{"role": "system", "content": "s" * 2000}, {"role": "user", "content": "hi"}]
    request = ProxyRequest("/v1/chat/completions", {"messages": messages}, False, "r", {})
    Lease(balancer.choose([a], request))
    assert balancer.in_flight_tokens(a) == len("system\n" + "s" * 2000 + "\nuser\nhi\n")


def test_ledger_forgets_idle_upstreams() -> None:
    ledger = InFlightTokens()
    gone = ups(1)[0]
    ledger.add(gone, 100)  # never leased: nothing in flight
    assert ledger.tokens(gone) == 0
    live = ups(1)[0]
    for _ in range(SWEEP_EVERY):
        ledger.add(live, 1)
        live.in_flight = 1
    assert gone.id not in ledger._entries
    assert ledger.tokens(live) == 1
