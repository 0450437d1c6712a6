"""Upstream call outcomes: the metric label of each, and which ones count against the upstream."""

from __future__ import annotations

from collections.abc import Callable

from pdproxy.errors import (
    ProxyError,
    UpstreamBadResponse,
    UpstreamBadStatus,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from pdproxy.upstreams import Upstream

Report = Callable[[Upstream, str, "str | None"], None]  # (upstream, outcome, reason)

_OUTCOMES: tuple[tuple[type[ProxyError], str], ...] = (
    (UpstreamRejected, "rejected"),
    (UpstreamTimeout, "timeout"),
    (UpstreamConnectError, "connect_error"),
    (UpstreamBadStatus, "bad_status"),
    (UpstreamBadResponse, "bad_response"),
    (UpstreamStreamBroken, "broken"),
)
# Outcomes that count against an upstream (a 4xx is the client's mistake; a cancel is the client's doing).
FAILURE_OUTCOMES = frozenset({"timeout", "connect_error", "bad_status", "bad_response", "broken"})


def outcome_of(error: ProxyError) -> str:
    """The metric label of an upstream call that ended in `error`."""
    for kind, label in _OUTCOMES:
        if isinstance(error, kind):
            return label
    return "error"
