"""Make a worker's routing see the whole host: shared load cells, caps across workers, the decision feed.

`share_routing(app, table, worker)` is the one call a worker makes after `build_app`: it wraps the
flow's two policies (the prefill leg's and the decode one) in `SharedBalancer` and keeps the
admission queue awake for releases made by the other workers. Nothing else in the request path
changes: `Lease` already tells the cells.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from pdproxy.errors import CapsTaken
from pdproxy.policies.base import Balancer, RoutingRequest
from pdproxy.routing.feed import DecisionFeed
from pdproxy.routing.load import LoadCell, WorkerRow
from pdproxy.routing.table import SharedTable, server_key
from pdproxy.routing.wiring import Background
from pdproxy.upstreams import Upstream

if TYPE_CHECKING:
    from pdproxy.app import App

WAKE_BUSY = 0.002  # seconds between looks at the others' releases while requests wait for a slot
WAKE_IDLE = 0.05  # ... and while none waits (only so a new waiter is noticed soon)
RACE_ATTEMPTS = 16  # reservations a decision may lose to other workers deciding at the same instant


class SharedBalancer:
    """Any policy, deciding on the host's load: cells hung on candidates, caps reserved across workers.

    A capped choice is reserved before it is returned (see `load`); when the reservation loses a
    race the policy chooses again among the rest. When no candidate can be reserved (every one
    taken by another worker in the same instant), CapsTaken: admission waits for a slot rather
    than a cap being broken.
    """

    def __init__(self, inner: Balancer, row: WorkerRow, feed: DecisionFeed | None = None) -> None:
        self.inner = inner
        self._row = row
        share = getattr(inner, "share", None)
        if feed is not None and share is not None:
            share(feed)

    def choose(self, candidates: Sequence[Upstream], request: RoutingRequest) -> Upstream:
        row = self._row
        for upstream in candidates:
            if upstream.shared is None:
                upstream.shared = row.cell(server_key(upstream.role.value, upstream.url), upstream.in_flight)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # called outside a loop (a benchmark of the decision alone): nothing to lease
            loop = None
        pool = candidates
        for _ in range(len(candidates) + RACE_ATTEMPTS):
            chosen = self.inner.choose(pool, request)
            cap = chosen.max_in_flight
            if cap <= 0 or loop is None:
                return chosen
            cell = cast(LoadCell, chosen.shared)
            if cell.reserve() <= cap:
                # The flow leases what a policy returns before it next awaits; a reservation still
                # open once this step of the loop is over was abandoned and must not hold a slot.
                loop.call_soon(cell.withdraw)
                return chosen
            cell.withdraw()
            pool = [u for u in pool if u is not chosen]
            if not pool:  # every one lost a race or filled up: the losers of a race withdrew, so look again
                os.sched_yield()  # let a worker that holds a reservation on this core decide
                pool = [u for u in candidates if not u.full]
                if not pool:
                    break
        role = candidates[0].role.value
        raise CapsTaken(f"every {role} upstream is at its in-flight cap (counted over all workers)",
                          side=role, retry_after=1)


def share_routing(app: App, table: SharedTable, worker: int) -> WorkerRow:
    """Wire worker `worker` of a host into `table`: call once, after build_app, before serving."""
    flow = app.flow
    row = WorkerRow(table, worker)
    flow.prefill.policy = SharedBalancer(flow.prefill.policy, row, DecisionFeed(table, worker))
    flow.decode_policy = SharedBalancer(flow.decode_policy, row, DecisionFeed(table, worker))
    app.services.append(Background(lambda: _wake_on_releases(row, flow.admission)))
    return row


async def _wake_on_releases(row: WorkerRow, admission: Any) -> None:
    """A release in another worker frees a slot this worker's queue may be waiting for: wake it."""
    seen = row.releases()
    while True:
        await asyncio.sleep(WAKE_BUSY if admission.waiting else WAKE_IDLE)
        releases = row.releases()
        if releases != seen:
            seen = releases
            admission.wake()
