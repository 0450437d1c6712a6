"""HedgeBudget: the hedge delay learned per server, the floor, and the Envoy-style budget."""

from __future__ import annotations

import pytest

from pdproxy.proxy.hedge import CHARS_PER_TOKEN, HedgeBudget, estimated_tokens
from pdproxy.request import ProxyRequest


def budget(**kwargs: float) -> HedgeBudget:
    values = {"multiple": 4.0, "floor": 1.0, "budget": 0.1, "min_hedges": 2} | kwargs
    return HedgeBudget(multiple=values["multiple"], floor=values["floor"], budget=values["budget"],
                       min_hedges=int(values["min_hedges"]))


def test_delay_is_the_floor_before_anything_was_observed() -> None:
    assert budget().delay("p1", 1000) == 1.0


def test_delay_is_a_multiple_of_the_learned_time_for_this_prompt() -> None:
    hedging = budget(floor=0.01)
    hedging.observe("p1", 1000, 2.0)  # 2 ms per token
    assert hedging.delay("p1", 1000) == pytest.approx(8.0)
    assert hedging.delay("p1", 100) == pytest.approx(0.8)
    assert hedging.delay("p1", 1) == 0.01  # never below the floor


def test_each_server_learns_its_own_time_and_a_new_one_borrows_the_pool_average() -> None:
    hedging = budget(floor=0.001)
    hedging.observe("slow", 100, 1.0)
    hedging.observe("fast", 100, 0.1)
    assert hedging.delay("slow", 100) > hedging.delay("fast", 100)
    fresh = hedging.delay("new", 100)
    assert hedging.delay("fast", 100) < fresh < hedging.delay("slow", 100)


def test_the_ewma_moves_towards_new_observations() -> None:
    hedging = budget()
    hedging.observe("p1", 1, 1.0)
    hedging.observe("p1", 1, 2.0)
    assert 1.0 < (hedging.per_token("p1") or 0) < 2.0


def test_budget_zero_never_hedges() -> None:
    hedging = budget(budget=0)
    assert not hedging.enabled
    assert hedging.delay("p1", 10) is None


def test_budget_is_a_share_of_prefills_in_flight_with_a_minimum() -> None:
    hedging = budget(budget=0.1, min_hedges=2)
    hedging.prefills = 5
    hedging.active = 1
    assert hedging.allows()
    hedging.active = 2
    assert not hedging.allows()  # the minimum: 0.1 x 5 rounds down to 0
    hedging.prefills = 30
    assert hedging.allows()  # 3 may run at 30 in flight
    hedging.active = 3
    assert not hedging.allows()


def request(body: dict[str, object]) -> ProxyRequest:
    return ProxyRequest("/v1/completions", body, False, "r", b"")


def test_estimated_tokens_of_each_prompt_form() -> None:
    assert estimated_tokens(request({"prompt": "x" * 400})) == 400 / CHARS_PER_TOKEN
    assert estimated_tokens(request({"prompt": [1, 2, 3]})) == 3
    assert estimated_tokens(request({"prompt": ["x" * 40]})) == 40 / CHARS_PER_TOKEN
    chat = {"messages": [{"role": "user", "content": "x" * 40},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 40}, {"type": "image"}]}]}
    assert estimated_tokens(request(chat)) == 80 / CHARS_PER_TOKEN
    assert estimated_tokens(request({"prompt": ""})) == 1.0
