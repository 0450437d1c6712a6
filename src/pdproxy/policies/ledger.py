"""In-flight prompt tokens per upstream, kept by a policy without any completion callback.

A policy sees decisions, not completions. The lease count (`Upstream.in_flight`) is exact: the
flow takes a lease on every upstream a policy returns and releases it in `finally`. So the ledger
records the estimated tokens of each request it assigns, in order, and before every decision
drops its oldest entries until it holds no more than `in_flight` of them. The count is therefore
always right; the sizes assume requests on one server finish in the order they were assigned,
which is how an engine's FCFS prefill scheduler runs them. When one finishes out of order the
ledger briefly carries the wrong size, and the error disappears once the server's queue turns
over (at the latest when it drains to zero). Memory is bounded by the leases out.

When routing state is shared across workers (`upstream.shared`), the upstream's load cell keeps
the same ledger in shared memory and this one defers to it: the totals are the host's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdproxy.upstreams import Upstream

SWEEP_EVERY = 1024  # decisions between sweeps that forget upstreams with nothing in flight


@dataclass(slots=True)
class _Entry:
    upstream: Upstream
    sizes: deque[int] = field(default_factory=deque)
    total: int = 0


class InFlightTokens:
    """Estimated tokens in flight per upstream, reconciled with its lease count."""

    __slots__ = ("_decisions", "_entries")

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._decisions = 0

    def tokens(self, upstream: Upstream) -> int:
        """Tokens of the requests still in flight on `upstream`, as far as this ledger assigned them."""
        if upstream.shared is not None:
            return upstream.shared.tokens()
        entry = self._entries.get(upstream.id)
        if entry is None:
            return 0
        sizes = entry.sizes
        while len(sizes) > upstream.in_flight:  # leases came back: the oldest requests are done
            entry.total -= sizes.popleft()
        return entry.total

    def add(self, upstream: Upstream, tokens: int) -> None:
        """Record a decision: `tokens` more are in flight on `upstream` once the flow leases it."""
        if upstream.shared is not None:
            upstream.shared.add_tokens(tokens)
            return
        entry = self._entries.get(upstream.id)
        if entry is None:
            entry = self._entries[upstream.id] = _Entry(upstream)
        entry.sizes.append(tokens)
        entry.total += tokens
        self._decisions += 1
        if self._decisions % SWEEP_EVERY == 0:
            self._sweep()

    def _sweep(self) -> None:
        """Forget upstreams with nothing in flight (removed ones among them): memory stays bounded."""
        for key, entry in list(self._entries.items()):
            if not self.tokens(entry.upstream) and not entry.sizes:
                del self._entries[key]
