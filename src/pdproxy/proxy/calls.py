"""The one boundary where upstream-call failures become the proxy's error tree, and where an
upstream's answer status is classified (the prefill leg, the decode leg and pass-through share it)."""

from __future__ import annotations

from pdproxy.client import (
    BadResponse,
    CallError,
    ConnectFailed,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    ResponseTimeout,
    ResponseTooLarge,
)
from pdproxy.errors import (
    UpstreamBadResponse,
    UpstreamBadStatus,
    UpstreamConnectError,
    UpstreamError,
    UpstreamKvLost,
    UpstreamRejected,
    UpstreamTimeout,
)


def translate(exc: CallError, *, side: str, upstream: str, stage: str, timeout: float | None = None) -> UpstreamError:
    """An upstream call's failure as the error the flow reports and may retry."""
    where = stage.replace("_", " ")
    if isinstance(exc, ConnectTimeout):
        return UpstreamTimeout(f"connecting to {side} upstream {upstream} timed out", side=side, upstream=upstream,
                               stage="connect")
    if isinstance(exc, ConnectFailed):
        return UpstreamConnectError(f"cannot connect to {side} upstream {upstream}: {exc}", side=side,
                                    upstream=upstream, stage="connect")
    if isinstance(exc, IdleTimeout):
        return UpstreamTimeout(f"{side} upstream {upstream} went silent ({where})", side=side, upstream=upstream,
                               stage="stream_idle")
    if isinstance(exc, FirstByteTimeout | ResponseTimeout):
        after = f" after {round(timeout, 2):g}s" if timeout else ""
        return UpstreamTimeout(f"{side} upstream {upstream} timed out ({where}{after})", side=side,
                               upstream=upstream, stage=stage)
    if isinstance(exc, BadResponse | ResponseTooLarge):
        return UpstreamBadResponse(f"{side} upstream {upstream} answered badly ({where}): {exc}", side=side,
                                   upstream=upstream, stage=stage)
    return UpstreamConnectError(f"{side} upstream {upstream} failed ({where}): {exc}", side=side,
                                upstream=upstream, stage=stage)


def check_status(status: int, content_type: str, payload: bytes, *, side: str, upstream: str) -> None:
    """2xx passes; a 4xx is the client's mistake, relayed unchanged; anything else is the upstream's fault
    (a 3xx included: redirects are never followed)."""
    if 200 <= status < 300:
        return
    if 400 <= status < 500:
        raise UpstreamRejected(status, content_type, payload, upstream)
    raise UpstreamBadStatus(f"{side} upstream {upstream} answered {status}", side=side, upstream=upstream)


def reruns_flow(error: UpstreamError) -> bool:
    """Whether a decode that failed before the client got a byte is worth a whole new flow: only when D never
    took the request (connect error, a timed-out connect), failed it (5xx, connection dropped) or could not
    load its KV. A timeout after D accepted the request is not: D may still be working on it, and a rerun
    would wait as long again (or, non-streamed, generate the whole answer again)."""
    if isinstance(error, UpstreamTimeout):
        return error.stage == "connect"
    return isinstance(error, UpstreamConnectError | UpstreamBadStatus | UpstreamKvLost)
