"""What a discovery source produces: the desired upstreams of the roles it covers, or why it could not tell.

A source knows nothing of pools, health or leases; it only watches something (a file, DNS names, the
Kubernetes API) and yields, each time it looks, the complete list it sees now. The reconciler turns the
difference into membership changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from pdproxy.upstreams import Role


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream a source wants: `ready=False` keeps it listed but drained (Kubernetes not ready)."""

    url: str
    weight: int = 1
    ready: bool = True


# The complete desired list of each role the source covers; a role left out is not the source's business.
Desired = Mapping[Role, tuple[Target, ...]]


@dataclass(frozen=True, slots=True)
class SourceFailure:
    """The source could not tell this time (bad file, DNS timeout, API error): the last list stays."""

    reason: str


Update = Desired | SourceFailure


class Source(Protocol):
    """A discovery source: `name` becomes its members' `source`; `updates()` runs until cancelled."""

    name: str

    def updates(self) -> AsyncIterator[Update]: ...


def merge_targets(targets: list[Target]) -> tuple[Target, ...]:
    """One target per URL (several names or slices may list the same address): ready wins, then the
    highest weight. Sorted, so equal lists compare equal."""
    best: dict[str, Target] = {}
    for target in targets:
        seen = best.get(target.url)
        if seen is None or (target.ready, target.weight) > (seen.ready, seen.weight):
            best[target.url] = target
    return tuple(best[url] for url in sorted(best))
