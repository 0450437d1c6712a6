"""Upstreams (one P or D API server each), their pools, and leases on them.

A pool's membership is an immutable tuple replaced in one assignment, so a
request reads one consistent snapshot without locks. In-flight counts change
only through `Lease`, whose `release()` is idempotent and is called in `finally`
on every path of the flow.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class State(str, enum.Enum):
    """Where an upstream stands; only some states are routable."""

    UNKNOWN = "unknown"  # configured, not probed yet: routable so start-up never blocks
    WARMING = "warming"  # added at runtime: no traffic before its first good probe (weights may be loading)
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"
    DRAINING = "draining"
    REMOVED = "removed"  # out of its pool; leases still out on it are only given back


ROUTABLE_STATES = frozenset({State.UNKNOWN, State.HEALTHY})
MAX_WEIGHT = 1000
# Who put an upstream in its pool. Discovery sources (`file`, `dns`, `kubernetes`) change only their own
# members; configured and admin-added ones are theirs to keep, and only those go into the state file.
CONFIGURED = "config"
ADMIN = "admin"


def normalize_url(address: str) -> str:
    """`host:port` or `http(s)://host:port[/]` → `scheme://host:port`; ValueError when it is not one."""
    text = address.strip()
    if not text:
        raise ValueError("empty upstream address")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"upstream {address!r}: scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"upstream {address!r}: give only scheme://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"upstream {address!r}: port must be 1-65535") from None
    if not parts.hostname:
        raise ValueError(f"upstream {address!r}: missing host")
    if port is None:
        raise ValueError(f"upstream {address!r}: missing port")
    if not 1 <= port <= 65535:
        raise ValueError(f"upstream {address!r}: port must be 1-65535")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


_ids = itertools.count(1)


class SharedLoad(Protocol):
    """This upstream's load as every worker of the host sees it (see pdproxy.routing.load).

    Set on an upstream when routing state is shared; `Lease` tells it of each lease it takes and
    gives back, so the other workers see them."""

    def in_flight(self) -> int: ...

    def tokens(self) -> int: ...

    def add_tokens(self, tokens: int) -> None: ...

    def acquire(self) -> None: ...

    def release(self) -> None: ...


@dataclass(slots=True, eq=False)
class Upstream:
    """One API server of a role. Mutable runtime state; identity is the object itself."""

    role: Role
    url: str
    weight: int = 1
    max_in_flight: int = 0  # 0: no cap
    state: State = State.UNKNOWN
    in_flight: int = 0
    served: int = 0
    last_error: str | None = None
    id: str = field(default_factory=lambda: f"u{next(_ids)}")
    source: str = CONFIGURED
    shared: SharedLoad | None = field(default=None, repr=False)  # set by pdproxy.routing when workers share
    kv_events: Callable[[], dict[str, object]] | None = field(default=None, repr=False)  # its KV-event view

    @property
    def load(self) -> int:
        """Requests in flight on this server from every worker of the host (this process's alone unshared)."""
        return self.in_flight if self.shared is None else self.shared.in_flight()
    # What the handoff learnt about this server (bootstrap port, engine id per DP rank), written only
    # by `handoff.discovery.MetadataRefresher`. `meta_error` set: the handoff cannot use this server,
    # so it is not routable whatever its health (the reason shows in describe()).
    meta: dict[str, Any] = field(default_factory=dict)
    meta_error: str | None = None

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE_STATES and self.meta_error is None

    def describe(self) -> dict[str, object]:
        """A JSON-ready view for operators (/health?verbose=1, the admin API)."""
        return {
            "id": self.id,
            "role": self.role.value,
            "url": self.url,
            "weight": self.weight,
            "max_in_flight": self.max_in_flight,
            "state": self.state.value,
            "in_flight": self.in_flight,
            "served": self.served,
            "last_error": self.last_error,
            "source": self.source,
            **({"kv_events": self.kv_events()} if self.kv_events is not None else {}),
            "meta": dict(self.meta),
            "meta_error": self.meta_error,
        }

    @property
    def full(self) -> bool:
        """At its concurrency cap (counted over every worker): every policy skips it until a lease comes back."""
        return 0 < self.max_in_flight <= self.load


class Lease:
    """One request's claim on an upstream: counted from the routing decision until released."""

    __slots__ = ("_on_release", "_released", "upstream")

    def __init__(self, upstream: Upstream, on_release: Callable[[Upstream], None] | None = None) -> None:
        self.upstream = upstream
        self._on_release = on_release
        self._released = False
        upstream.in_flight += 1
        if upstream.shared is not None:
            upstream.shared.acquire()

    def release(self) -> None:
        """Give the slot back (and tell whoever waits for one); safe to call more than once."""
        if not self._released:
            self._released = True
            self.upstream.in_flight -= 1
            self.upstream.served += 1
            if self.upstream.shared is not None:
                self.upstream.shared.release()
            if self._on_release is not None:
                self._on_release(self.upstream)


class UpstreamPool:
    """The upstreams of one role; `members` is an immutable snapshot."""

    def __init__(self, role: Role, members: Iterable[Upstream] = ()) -> None:
        self.role = role
        self.members: tuple[Upstream, ...] = tuple(members)

    def routable(self) -> tuple[Upstream, ...]:
        """Upstreams whose state allows traffic (health is filtered here and only here)."""
        return tuple(u for u in self.members if u.routable)

    def available(self, exclude: Collection[Upstream] = ()) -> list[Upstream]:
        """What a policy may choose from: routable, under its cap, and not in `exclude`."""
        return [u for u in self.members if u.routable and not u.full and u not in exclude]

    def find(self, url: str) -> Upstream | None:
        return next((u for u in self.members if u.url == url), None)

    def add(self, upstream: Upstream) -> None:
        self.members = (*self.members, upstream)

    def remove(self, upstream: Upstream) -> None:
        self.members = tuple(u for u in self.members if u is not upstream)

    def total_in_flight(self) -> int:
        return sum(u.in_flight for u in self.members)
