"""The proxy's error tree and its one rendering into OpenAI's error shape.

    ProxyError                      status  side      retry  OpenAI type
    ├── ClientError                 4xx     client    no     invalid_request_error
    │   ├── InvalidRequest          400
    │   ├── Unauthorized            401     (admin API: missing or wrong token)
    │   ├── Forbidden               403     (admin API: not loopback and no token configured)
    │   ├── NotFound                404
    │   │   └── ModelNotFound       404     NotFoundError (no upstream serves the request's model: vLLM's shape)
    │   ├── MethodNotAllowed        405
    │   ├── RequestTimeout          408     (the client was too slow sending its request)
    │   ├── Conflict                409     (admin API: the change conflicts with the membership, e.g. full)
    │   ├── TooManyRequests         429     (a client API key over its cap on requests in flight)
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedMediaType    415     (a request Content-Encoding the proxy cannot decode)
    │   ├── ExpectationFailed       417     (an Expect other than 100-continue)
    │   └── HeadersTooLarge         431
    ├── Unavailable                 503     internal  no     service_unavailable   (no routable upstream, every
    │   │                                                    prefill attempt refused, proxy full: Retry-After)
    │   └── CapsTaken               503     (--workers: other workers took the last slots; admission waits)
    ├── LoopDetected                508     internal  no     loop_detected  (the request carries this proxy's
    │                                                        own Via token: an upstream points back at it)
    ├── UpstreamError               502     prefill/  yes    upstream_error
    │   ├── UpstreamConnectError    502     decode
    │   ├── UpstreamBadStatus       502            (5xx from the upstream)
    │   ├── UpstreamBadResponse     502            (a 2xx body that is not what the protocol says)
    │   ├── UpstreamTimeout         504            (a decode timeout after D accepted the request does not
    │   │                                           rerun the flow: `pdproxy.proxy.calls.reruns_flow`)
    │   ├── UpstreamKvLost          502     decode    yes    (D could not load the KV blocks: P died or freed
    │   │                                                    them; blamed on P, outcome `kv_lost`)
    │   └── UpstreamStreamBroken    502     decode    no     (died after bytes reached the client)
    └── UpstreamRejected            4xx     client    no     relayed unchanged: the client's own mistake

Blame (what counts toward an upstream's ejection) follows the upstream at fault, not the one that
reported it: `UpstreamKvLost` surfaces on D's leg but names the P whose KV handle was lost in
`blamed`, and the flow reports the failure against that P (outcome `kv_lost`); D is not charged.

Every error knows the HTTP status it maps to, which side caused it (for logs and
metrics) and whether the flow may retry it on another upstream. Upstream-call failures are
translated in one place, `pdproxy.proxy.calls.translate`.
"""

from __future__ import annotations

import orjson

from pdproxy.http.response import Response


class ProxyError(Exception):
    """Base of every error the proxy reports to a client."""

    status: int = 500
    error_type: str = "internal_error"
    side: str = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None, side: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = {}
        if side is not None:
            self.side = side

    def body(self) -> bytes:
        """The OpenAI error JSON for this error."""
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                       "code": self.status}}
        )

    def response(self, request_id: str | None = None) -> Response:
        """An HTTP response carrying this error."""
        headers = {**self.headers, "X-Request-Id": request_id} if request_id else self.headers
        return Response(status=self.status, body=self.body(), headers=tuple(headers.items()))

    def sse_event(self) -> bytes:
        """A final SSE event for a stream that already started: the client reads it as an error."""
        return b"data: " + self.body() + b"\n\n"


class ClientError(ProxyError):
    """The client's request is wrong; retrying it unchanged cannot help."""

    status = 400
    error_type = "invalid_request_error"
    side = "client"


class InvalidRequest(ClientError):
    status = 400


class Unauthorized(ClientError):
    status = 401
    error_type = "authentication_error"

    def __init__(self, message: str, *, param: str | None = None, side: str | None = None) -> None:
        super().__init__(message, param=param, side=side)
        self.headers["WWW-Authenticate"] = "Bearer"


class Forbidden(ClientError):
    status = 403
    error_type = "permission_error"


class NotFound(ClientError):
    status = 404


class ModelNotFound(NotFound):
    """vLLM's answer for a model it does not serve, type and all, so clients see the same error either way."""

    error_type = "NotFoundError"


class MethodNotAllowed(ClientError):
    status = 405


class RequestTimeout(ClientError):
    status = 408


class Conflict(ClientError):
    status = 409


class TooManyRequests(ClientError):
    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, param: str | None = None, side: str | None = None,
                 retry_after: int = 1) -> None:
        super().__init__(message, param=param, side=side)
        self.headers["Retry-After"] = str(retry_after)


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class ExpectationFailed(ClientError):
    status = 417


class HeadersTooLarge(ClientError):
    status = 431


class Unavailable(ProxyError):
    """No upstream of a role can take the request, the proxy is full, or it is shutting down."""

    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, param: str | None = None, side: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message, param=param, side=side)
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)


class CapsTaken(Unavailable):
    """Every candidate's cap was taken by other workers in the same instant (`--workers`): a slot
    frees soon, so admission waits for one (bounded by the queue timeout) instead of refusing."""


class LoopDetected(ProxyError):
    """The request came back to this proxy (its own Via token): answered at once, so a
    misconfigured upstream fails fast instead of multiplying one request into thousands."""

    status = 508
    error_type = "loop_detected"


class UpstreamError(ProxyError):
    """An upstream failed; another upstream may succeed."""

    status = 502
    error_type = "upstream_error"
    retryable = True

    def __init__(self, message: str, *, side: str, upstream: str, stage: str = "") -> None:
        super().__init__(message, side=side)
        self.upstream = upstream
        self.stage = stage  # where it happened: connect, prefill, decode_first_byte, stream_idle, ...


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamBadStatus(UpstreamError):
    pass


class UpstreamBadResponse(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "upstream_timeout"


class UpstreamKvLost(UpstreamError):
    """D answered that it could not load the prefilled KV blocks: the fault of the P that made
    them (it died, or freed them), so `blamed` names that P. Retryable: a fresh prefill on
    another P, then D again."""

    outcome = "kv_lost"  # the `outcome` label of pdproxy_upstream_requests_total, reported against P

    def __init__(self, message: str, *, upstream: str, blamed: str, stage: str = "decode_first_byte") -> None:
        super().__init__(message, side="decode", upstream=upstream, stage=stage)
        self.blamed = blamed


class UpstreamStreamBroken(UpstreamError):
    """The stream died after bytes reached the client: never retried (text would repeat)."""

    retryable = False


class UpstreamRejected(ProxyError):
    """An upstream answered 4xx: the client's mistake, relayed to it unchanged."""

    side = "client"

    def __init__(self, status: int, content_type: str, payload: bytes, upstream: str) -> None:
        super().__init__(f"upstream {upstream} answered {status}")
        self.status = status
        self.content_type = content_type
        self.payload = payload
        self.upstream = upstream

    def body(self) -> bytes:
        return self.payload

    def response(self, request_id: str | None = None) -> Response:
        headers = (("X-Request-Id", request_id),) if request_id else ()
        return Response(status=self.status, body=self.payload, headers=headers, content_type=self.content_type)
