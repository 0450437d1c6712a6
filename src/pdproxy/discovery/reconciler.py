"""The one place discovery touches membership: desired lists in, add / drain / remove calls out.

Rules, per role the source covers:
- a ready target that is not a member is added through Membership (so it warms up like an admin add);
- a member of this source that is listed not ready is drained at once; listed ready again, undrained;
- a member of this source missing from the list is left alone for `removal_delay` seconds (damping: a
  flapping record does not churn the pool), then drained and removed once idle;
- members this source did not add (configured, admin-added, another source) are never touched, even
  when the source lists the same URL;
- a failure of the source changes nothing: it is logged and counted, the last list stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pdproxy.discovery.base import Source, SourceFailure, Target, Update
from pdproxy.membership import Membership
from pdproxy.metrics import Metrics
from pdproxy.upstreams import Role, State, Upstream

log = logging.getLogger("pdproxy.discovery")


@dataclass(slots=True)
class Reconciler:
    """Applies one source's lists to the membership. Synchronous steps; `run` drives them."""

    membership: Membership
    source: str
    removal_delay: float
    caps: Mapping[Role, int]
    metrics: Metrics | None = None
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    _missing_since: dict[str, float] = field(default_factory=dict)  # member id -> when it left the list
    _drained: set[str] = field(default_factory=set)  # member ids this reconciler drained (not ready)
    _removing: set[str] = field(default_factory=set)  # member ids this reconciler is removing
    _foreign: set[tuple[Role, str]] = field(default_factory=set)  # URLs listed but owned by someone else

    def apply(self, update: Update) -> None:
        if isinstance(update, SourceFailure):
            log.error("%s discovery failed, keeping the last list: %s", self.source, update.reason)
            if self.metrics is not None:
                self.metrics.discovery_errors.labels(self.source).inc()
            return
        if self.metrics is not None:
            self.metrics.discovery_updates.labels(self.source).inc()
            self.metrics.discovery_last_success.labels(self.source).set(self.wall_clock())
        for role, targets in update.items():
            self._apply_role(role, targets)
        self.expire()

    def _apply_role(self, role: Role, targets: tuple[Target, ...]) -> None:
        wanted = {target.url: target for target in targets}
        for target in targets:
            self._want(role, target)
        now = self.clock()
        for upstream in self._mine(role):
            if upstream.url not in wanted and upstream.id not in self._removing:
                self._missing_since.setdefault(upstream.id, now)

    def _want(self, role: Role, target: Target) -> None:
        upstream = self.membership.find(role, target.url)
        if upstream is None:
            if target.ready:  # a target never seen ready is not worth warming up yet
                self.membership.add(role, target.url, weight=target.weight, max_in_flight=self.caps.get(role, 0),
                                    by=self.source)
                self._count("add")
            return
        if upstream.source != self.source:
            if (role, target.url) not in self._foreign:  # say it once, not at every look
                self._foreign.add((role, target.url))
                log.info("%s discovery lists %s %s, which %s already holds: left alone", self.source,
                         role.value, target.url, upstream.source)
            return
        self._missing_since.pop(upstream.id, None)
        if upstream.id in self._removing:  # back before its drain ended: take it back
            self._removing.discard(upstream.id)
            self._drained.discard(upstream.id)
            self.membership.add(role, target.url, weight=target.weight, max_in_flight=upstream.max_in_flight,
                                by=self.source)
            self._count("add")
        if upstream.weight != target.weight:
            self.membership.set_weight(upstream, target.weight, by=self.source)
            self._count("update")
        if not target.ready and upstream.state is not State.DRAINING:
            self.membership.set_drained(upstream, True, by=self.source)
            self._drained.add(upstream.id)
            self._count("drain")
        elif target.ready and upstream.id in self._drained:
            self._drained.discard(upstream.id)
            if upstream.state is State.DRAINING:  # an operator's own drain is theirs to lift
                self.membership.set_drained(upstream, False, by=self.source)
                self._count("undrain")

    def expire(self) -> float | None:
        """Drain-then-remove the members gone longer than the delay; seconds until the next one is due."""
        now = self.clock()
        members = {u.id: u for u in self.membership.members()}
        next_due: float | None = None
        for upstream_id, since in list(self._missing_since.items()):
            upstream = members.get(upstream_id)
            if upstream is None:  # removed meanwhile (e.g. by an operator)
                del self._missing_since[upstream_id]
                continue
            due = since + self.removal_delay - now
            if due > 0:
                next_due = due if next_due is None else min(next_due, due)
                continue
            del self._missing_since[upstream_id]
            self._drained.discard(upstream_id)
            log.info("%s upstream %s gone from %s discovery for %gs: draining, then removing",
                     upstream.role.value, upstream.url, self.source, self.removal_delay)
            if not self.membership.remove(upstream, by=self.source):
                self._removing.add(upstream_id)
            self._count("remove")
        self._removing.intersection_update(members)
        return next_due

    def _mine(self, role: Role) -> list[Upstream]:
        return [u for u in self.membership.pools[role].members if u.source == self.source]

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.discovery_changes.labels(self.source, action).inc()

    async def run(self, source: Source) -> None:
        """Apply the source's updates as they come, and removals when they fall due, until cancelled."""
        queue: asyncio.Queue[Update] = asyncio.Queue(maxsize=1)
        pump = asyncio.ensure_future(_pump(source, queue))
        try:
            while True:
                due = self.expire()
                try:
                    # Bounded by the next removal's due time, so damping ends on time with no new update.
                    update = await asyncio.wait_for(queue.get(), due)
                except asyncio.TimeoutError:
                    continue
                self.apply(update)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def _pump(source: Source, queue: asyncio.Queue[Update]) -> None:
    """Move a source's updates to the queue; a source that stops or crashes is an error, then it restarts."""
    while True:
        try:
            async for update in source.updates():
                await queue.put(update)
            reason = "the source stopped"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a source must not end discovery for the process's lifetime
            log.exception("%s discovery crashed", source.name)
            reason = f"the source crashed: {exc!r}"
        await queue.put(SourceFailure(reason))
        await asyncio.sleep(1.0)  # no hot loop when a source fails at once every time

