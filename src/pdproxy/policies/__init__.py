"""Load-balancing policies: one module per policy behind `Balancer.choose`, one registry.

Policies receive only routable upstreams under their cap (the pool filters health and caps) and
never change upstream state; in-flight counts come from leases. Randomness and the clock are
injected so tests are deterministic. An unknown name fails at start-up listing the valid ones.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdproxy.policies.base import Balancer, RoutingRequest
from pdproxy.policies.cache_aware import LOAD_MEASURES, CacheAware
from pdproxy.policies.least_conn import LeastConn
from pdproxy.policies.least_tokens import LeastTokens
from pdproxy.policies.prefix_hash import PrefixHash
from pdproxy.policies.round_robin import RoundRobin
from pdproxy.policies.tokens import make_token_counter

__all__ = [
    "LOAD_MEASURES",
    "POLICIES",
    "Balancer",
    "CacheAware",
    "LeastConn",
    "LeastTokens",
    "PolicyOptions",
    "PrefixHash",
    "RoundRobin",
    "RoutingRequest",
    "make_balancer",
]


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    """The policy knobs from Settings (see there for meanings and defaults), parsed once at start-up."""

    prefix_chars: int
    vnodes: int
    load_factor: float
    block_chars: int
    index_max_blocks: int
    cache_weight: float
    cache_load: str
    chars_per_token: float
    tokenizer: str | None = None


PolicyFactory = Callable[[PolicyOptions, random.Random, Callable[[], float]], Balancer]


def _cache_aware(options: PolicyOptions, rng: random.Random, clock: Callable[[], float]) -> Balancer:
    return CacheAware(
        rng=rng, clock=clock, counter=make_token_counter(options.tokenizer, options.chars_per_token),
        block_chars=options.block_chars, max_blocks=options.index_max_blocks, weight=options.cache_weight,
        load=options.cache_load,
    )


POLICIES: dict[str, PolicyFactory] = {
    "least_conn": lambda options, rng, clock: LeastConn(rng),
    "round_robin": lambda options, rng, clock: RoundRobin(),
    "prefix_hash": lambda options, rng, clock: PrefixHash(options.prefix_chars, options.vnodes, options.load_factor),
    "least_tokens": lambda options, rng, clock: LeastTokens(
        rng, make_token_counter(options.tokenizer, options.chars_per_token)),
    "cache_aware": _cache_aware,
}


def make_balancer(
    name: str, options: PolicyOptions, *, rng: random.Random, clock: Callable[[], float] = time.monotonic
) -> Balancer:
    """Build the named policy; ValueError lists the valid names (or says which option is wrong)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    return factory(options, rng, clock)
