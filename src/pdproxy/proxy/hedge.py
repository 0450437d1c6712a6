"""When a prefill attempt is hedged on another P, and how many hedges may run at once.

A prefill attempt's hedge delay is what this prompt should take on this server, times a margin:
`multiple` x (the server's observed seconds per estimated prompt token) x (this prompt's estimated
tokens), never below `floor`. The per-token time is an EWMA over the server's successful prefills
(queueing included: a busy P is expected to be slower, so it is not hedged for being busy); a
server with no observation yet borrows the pool-wide EWMA, and with none at all the floor applies.

The budget is Envoy's retry budget applied to hedges: at most `budget` x (prefills in flight) hedges
run at once (rounded down), and never fewer than `min_hedges` may, so a proxy at a low rate can still hedge.
Everything here is arithmetic on the request path: no task, no timer (the leg owns the one timer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdproxy.request import ProxyRequest

CHARS_PER_TOKEN = 4.0  # the estimate's unit: only the ratio to observed times matters, any stable unit works
EWMA_WEIGHT = 0.2  # weight of the newest observation
MAX_TRACKED = 4096  # per-server entries kept; past it the table is cleared (servers removed long ago go)


@dataclass(slots=True)
class HedgeBudget:
    """Hedge delays learned per prefill server, and the count of hedges in flight against the budget.

    `budget` 0 turns hedging off (`delay` answers None)."""

    multiple: float
    floor: float
    budget: float
    min_hedges: int
    prefills: int = 0  # requests inside their prefill leg now
    active: int = 0  # hedges running now
    _per_token: dict[str, float] = field(default_factory=dict)  # upstream url -> EWMA s per token
    _pool_per_token: float = 0.0  # EWMA over every server; 0 = nothing observed yet

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def delay(self, upstream: str, tokens: float) -> float | None:
        """Seconds after which an attempt on `upstream` for a prompt of `tokens` is hedged; None: never."""
        if self.budget <= 0:
            return None
        per_token = self._per_token.get(upstream) or self._pool_per_token
        return max(self.floor, self.multiple * per_token * tokens)

    def observe(self, upstream: str, tokens: float, seconds: float) -> None:
        """A successful prefill of `tokens` on `upstream` took `seconds`."""
        if tokens <= 0:
            return
        sample = seconds / tokens
        old = self._per_token.get(upstream)
        if old is None and len(self._per_token) >= MAX_TRACKED:
            self._per_token.clear()
        self._per_token[upstream] = sample if old is None else old + EWMA_WEIGHT * (sample - old)
        pool = self._pool_per_token
        self._pool_per_token = sample if not pool else pool + EWMA_WEIGHT * (sample - pool)

    def allows(self) -> bool:
        """Whether one more hedge fits the budget now."""
        return self.active < max(self.min_hedges, int(self.budget * self.prefills))

    def per_token(self, upstream: str) -> float | None:
        """The learned seconds per token of `upstream` (None: nothing observed), for tests and operators."""
        return self._per_token.get(upstream)


def estimated_tokens(preq: ProxyRequest) -> float:
    """A cheap estimate of the prompt's tokens: characters / CHARS_PER_TOKEN, token ids counted as they are.
    No rendering: the lengths of the strings the body already holds."""
    body = preq.body
    prompt = body.get("prompt")
    if prompt is not None:
        return _prompt_tokens(prompt)
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return max(1.0, chars / CHARS_PER_TOKEN)


def _prompt_tokens(prompt: Any) -> float:
    if isinstance(prompt, str):
        return max(1.0, len(prompt) / CHARS_PER_TOKEN)
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return float(len(prompt))  # token ids
        return _prompt_tokens(prompt[0])
    return 1.0
