"""Passive outlier detection (Envoy-style): eject upstreams whose requests keep failing.

The flow only reports outcomes; this class decides. `eject_after` consecutive
failures (connect errors, timeouts, 5xx, broken answers; never a 4xx) eject an
upstream for `base × (times ejected)` seconds, capped at `max_time`. With active
health checks it returns on the first successful probe after that; without them,
when the time is over. At most `max_share` of a pool is ejected at once (always at
least one upstream may be), so a flaky network cannot empty a pool by itself, and the last
healthy member of a pool is never ejected: for a one-D deployment, three failures of any origin
would otherwise mean an outage of `base` seconds. Its failures keep counting, so it is ejected
as soon as another member is healthy again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pdproxy.health import StateBoard
from pdproxy.upstreams import ROUTABLE_STATES, Role, State, Upstream, UpstreamPool

log = logging.getLogger("pdproxy.outlier")

class OutlierDetector(Protocol):
    """Receives every upstream call's outcome."""

    def report(self, upstream: Upstream, failure: str | None) -> None:
        """`failure` is None for a success, else why the call failed."""
        ...

    def ejection_over(self, upstream: Upstream) -> bool: ...

    def forget(self, upstream: Upstream) -> None:
        """Drop what is known of a removed upstream (membership churn must not grow memory)."""
        ...


class NoOutlierDetection:
    """Passive ejection switched off."""

    def report(self, upstream: Upstream, failure: str | None) -> None:
        pass

    def ejection_over(self, upstream: Upstream) -> bool:
        return True

    def forget(self, upstream: Upstream) -> None:
        pass


@dataclass(slots=True)
class _Record:
    consecutive: int = 0
    ejections: int = 0
    until: float = 0.0
    held: bool = False  # over the limit but kept as its pool's last healthy member (said once per streak)


class ConsecutiveFailureDetector:
    """Ejects after `eject_after` consecutive failures; see the module docstring."""

    def __init__(
        self,
        board: StateBoard,
        pools: Mapping[Role, UpstreamPool],
        *,
        eject_after: int,
        base_time: float,
        max_time: float,
        max_share: float,
        return_on_expiry: bool,
        clock: Callable[[], float],
    ) -> None:
        self._board = board
        self._pools = pools
        self._eject_after = eject_after
        self._base_time = base_time
        self._max_time = max_time
        self._max_share = max_share
        self._return_on_expiry = return_on_expiry
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def report(self, upstream: Upstream, failure: str | None) -> None:
        record = self._records.get(upstream.id)
        if failure is None:
            if record is not None:
                record.consecutive = 0
                record.held = False
                if record.ejections and self._clock() > record.until + self._max_time:
                    record.ejections = 0  # well behaved for a long while: start again from the base time
            return
        if record is None:
            record = self._records[upstream.id] = _Record()
        record.consecutive += 1
        if record.consecutive >= self._eject_after and upstream.state in ROUTABLE_STATES and self._may_eject(upstream):
            self._eject(upstream, record, failure)

    def ejection_over(self, upstream: Upstream) -> bool:
        record = self._records.get(upstream.id)
        return record is None or self._clock() >= record.until

    def forget(self, upstream: Upstream) -> None:
        self._records.pop(upstream.id, None)

    def _may_eject(self, upstream: Upstream) -> bool:
        members = self._pools[upstream.role].members
        if not any(u.routable for u in members if u is not upstream):
            record = self._records[upstream.id]
            if not record.held:
                record.held = True
                log.warning("%s upstream %s: %d consecutive failures, but it is the last healthy member of its "
                            "pool: not ejected", upstream.role.value, upstream.url, record.consecutive)
            return False
        ejected = sum(1 for u in members if u.state is State.EJECTED)
        return ejected < max(1, math.floor(self._max_share * len(members)))

    def _eject(self, upstream: Upstream, record: _Record, failure: str) -> None:
        record.ejections += 1
        duration = min(self._base_time * record.ejections, self._max_time)
        record.until = self._clock() + duration
        failures, record.consecutive, record.held = record.consecutive, 0, False
        self._board.set(upstream, State.EJECTED,
                        f"{failures} consecutive failures, last: {failure}; ejected for {duration:g}s")
        if self._return_on_expiry:
            asyncio.get_running_loop().call_later(duration, self._expire, upstream)

    def _expire(self, upstream: Upstream) -> None:
        if upstream.state is not State.EJECTED:
            return
        if self.ejection_over(upstream):
            self._board.set(upstream, State.HEALTHY, "ejection time over")
        else:  # the loop's timer may fire a little before the clock says so (uvloop): look again then
            remaining = self._records[upstream.id].until - self._clock()
            asyncio.get_running_loop().call_later(max(remaining, 0.001), self._expire, upstream)
