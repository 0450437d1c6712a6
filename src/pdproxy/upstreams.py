"""Upstreams (one P or D API server each), their pools, and leases on them.

A pool's membership is an immutable tuple replaced in one assignment, so a
request reads one consistent snapshot without locks. In-flight counts change
only through `Lease`, whose `release()` is idempotent and is called in `finally`
on every path of the flow.

Healthy panic (Envoy's): when fewer than `panic_threshold` of a pool's members in service are
healthy, the health signal itself is suspect (an overloaded fleet failing its probes, a network
blip ejecting half the pool), so the pool routes to every member in service again rather than
pile the whole load on the few that remain.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import logging
import re
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
# Members in service: routable, or kept out by health alone. Panic routes to these; an operator's
# drain, a removal and a warm-up (weights may still be loading) are never overridden.
IN_SERVICE_STATES = frozenset({*ROUTABLE_STATES, State.UNHEALTHY, State.EJECTED})
MAX_WEIGHT = 1000
MAX_HOST_CHARS = 253  # RFC 1035/1123: a name's text form
MAX_LABEL_CHARS = 63
# RFC 1123 labels, plus `_`: Docker Compose service names use it and resolvers accept it.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

log = logging.getLogger("pdproxy.upstreams")
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
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. a bracketed host that is no IPv6 address
        raise ValueError(f"upstream {address!r}: host must be an IP address or a DNS name") from None
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
    host = _valid_host(parts.hostname, address)
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def _valid_host(host: str, address: str) -> str:
    """An IP literal, or a DNS name of RFC 1123 labels (IDNA names as their ASCII form); ValueError else.

    The check runs before anything is added, so a bad name fails its admin call with 400 instead
    of failing every health probe for ever."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"upstream {address!r}: host is not a valid internationalized name") from None
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name may end with a dot
    if len(name) > MAX_HOST_CHARS:
        raise ValueError(f"upstream {address!r}: host names are at most {MAX_HOST_CHARS} characters")
    labels = name.split(".")
    for label in labels:
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"upstream {address!r}: each part of a host name is at most {MAX_LABEL_CHARS} "
                             "characters")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"upstream {address!r}: host must be an IP address or a DNS name (letters, digits, "
                             "'-' and '_' between dots)")
    if all(label.isdigit() for label in labels):  # `10.1` or `999.0.0.1`: neither a name nor an IPv4 address
        raise ValueError(f"upstream {address!r}: {host!r} is not a valid IPv4 address")
    return host


MAX_MODEL_NAME_CHARS = 256


def check_model_name(name: str) -> str:
    """A configured model name, stripped; ValueError when it cannot be one (empty, spaces, too long)."""
    text = name.strip()
    if not text or len(text) > MAX_MODEL_NAME_CHARS or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"model name {name!r}: 1-{MAX_MODEL_NAME_CHARS} printable characters without spaces")
    return text


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
    # The model names it serves, its primary (default) name first: configured (`models_fixed`, never
    # overwritten) or read from its /v1/models by the health probe; () until known (see pdproxy.served_models).
    models: tuple[str, ...] = ()
    models_fixed: bool = False
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
            "models": list(self.models),
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
    """The upstreams of one role; `members` is an immutable snapshot.

    `panic_threshold` (0 turns panic off): below this share of healthy members in service, the
    pool is in panic and routes to every member in service (see the module docstring)."""

    def __init__(self, role: Role, members: Iterable[Upstream] = (), *, panic_threshold: float = 0.0) -> None:
        if not 0.0 <= panic_threshold <= 1.0:
            raise ValueError("panic_threshold is a share of the pool: 0 to 1")
        self.role = role
        self.members: tuple[Upstream, ...] = tuple(members)
        self.panic_threshold = panic_threshold
        self._in_panic = False  # as last computed; a change is logged once

    def healthy(self) -> tuple[Upstream, ...]:
        """Members whose own state allows traffic, panic or not (for /health and the ejection budget)."""
        return tuple(u for u in self.members if u.routable)

    def routable(self) -> tuple[Upstream, ...]:
        """Upstreams that may get traffic now (health is filtered here and only here): the healthy
        ones, or in panic every member in service."""
        healthy = self.healthy()
        if self.panic_threshold and self._check_panic(len(healthy)):
            # Panic overrides health, never missing handoff metadata: a plan cannot be built without it.
            return tuple(u for u in self.members if u.state in IN_SERVICE_STATES and u.meta_error is None)
        return healthy

    def available(self, exclude: Collection[Upstream] = ()) -> list[Upstream]:
        """What a policy may choose from: routable, under its cap, and not in `exclude`."""
        return [u for u in self.routable() if not u.full and u not in exclude]

    def may_route(self, upstream: Upstream) -> bool:
        """Whether `upstream` may get traffic now, panic included (`upstream.routable` is its own state
        only): for a choice made earlier and checked again, such as the D leased at admission."""
        if upstream.routable:
            return True
        return (upstream.state in IN_SERVICE_STATES and upstream.meta_error is None and upstream in self.members
                and self.check_panic())

    def check_panic(self) -> bool:
        """Whether the pool routes to unhealthy members now; logs entering or leaving panic (the
        metrics ask at scrape time, membership after every state change)."""
        return bool(self.panic_threshold) and self._check_panic(sum(1 for u in self.members if u.routable))

    def _check_panic(self, healthy: int) -> bool:
        """Panic when `healthy` is under the threshold's share of the members in service; log a change."""
        in_service = sum(1 for u in self.members if u.state in IN_SERVICE_STATES)
        panic = healthy < self.panic_threshold * in_service
        if panic is not self._in_panic:
            self._in_panic = panic
            if panic:
                log.warning("%s pool in panic: %d of %d members in service are healthy (under %g%%): routing to "
                            "all of them", self.role.value, healthy, in_service, self.panic_threshold * 100)
            else:
                log.info("%s pool out of panic: %d of %d members in service are healthy", self.role.value,
                         healthy, in_service)
        return panic

    def find(self, url: str) -> Upstream | None:
        return next((u for u in self.members if u.url == url), None)

    def add(self, upstream: Upstream) -> None:
        self.members = (*self.members, upstream)

    def remove(self, upstream: Upstream) -> None:
        self.members = tuple(u for u in self.members if u is not upstream)

    def total_in_flight(self) -> int:
        return sum(u.in_flight for u in self.members)
