"""The upstream client's errors: one base class, one subclass per way a call can fail.

`kind` is a stable short name (for metrics and logs); `reused` says whether the connection had served an earlier
request and `got_response_bytes` whether any response byte arrived: together they decide whether a failure is a
stale keep-alive connection (safe to re-send) or the upstream's fault.
"""

from __future__ import annotations


class CallError(Exception):
    """A call to an upstream failed; the message names the upstream and what happened."""

    kind: str = "error"

    def __init__(self, message: str, *, reused: bool = False, got_response_bytes: bool = False) -> None:
        super().__init__(message)
        self.reused = reused
        self.got_response_bytes = got_response_bytes


class ConnectFailed(CallError):
    """Refused, unreachable or unresolvable: the request never left the proxy."""

    kind = "connect_failed"


class ConnectTimeout(CallError):
    """No connection within connect_timeout (TCP/TLS handshake or waiting for a free slot under max_connections)."""

    kind = "connect_timeout"


class FirstByteTimeout(CallError):
    """A stream's response head and first body bytes did not arrive within first_byte_timeout."""

    kind = "first_byte_timeout"


class ResponseTimeout(CallError):
    """fetch's overall timeout (send, first byte and body) ran out."""

    kind = "timeout"


class IdleTimeout(CallError):
    """The upstream went silent mid-stream for longer than idle_timeout (time paused by the caller not counted)."""

    kind = "idle_timeout"


class BadResponse(CallError):
    """Not valid HTTP/1.1: garbage, a head over max_header_bytes, invalid chunk framing. The connection is closed."""

    kind = "bad_response"


class ResponseTooLarge(CallError):
    """A whole-body read went over its byte cap; the connection is closed so the rest is never buffered."""

    kind = "too_large"


class ConnectionLost(CallError):
    """The upstream closed or reset the connection before the message was complete."""

    kind = "connection_lost"


class ClientClosed(CallError):
    """The client was closed: in-flight calls end with this and later calls raise it at once."""

    kind = "client_closed"
