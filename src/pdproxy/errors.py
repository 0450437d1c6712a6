"""The proxy's error tree and its one rendering into OpenAI's error shape.

    ProxyError                      status  side      retry  OpenAI type
    ├── ClientError                 4xx     client    no     invalid_request_error
    │   ├── InvalidRequest          400
    │   ├── Unauthorized            401     (admin API: missing or wrong token)
    │   ├── Forbidden               403     (admin API: not loopback and no token configured)
    │   ├── NotFound                404
    │   ├── MethodNotAllowed        405
    │   ├── RequestTimeout          408     (the client was too slow sending its request)
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedMediaType    415     (a request Content-Encoding the proxy cannot decode)
    │   ├── ExpectationFailed       417     (an Expect other than 100-continue)
    │   └── HeadersTooLarge         431
    ├── Unavailable                 503     internal  no     service_unavailable   (no routable upstream)
    ├── UpstreamError               502     prefill/  yes    upstream_error
    │   ├── UpstreamConnectError    502     decode
    │   ├── UpstreamBadStatus       502            (5xx from the upstream)
    │   ├── UpstreamBadResponse     502            (a 2xx body that is not what the protocol says)
    │   ├── UpstreamTimeout         504
    │   └── UpstreamStreamBroken    502     decode    no     (died after bytes reached the client)
    └── UpstreamRejected            4xx     client    no     relayed unchanged: the client's own mistake

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


class MethodNotAllowed(ClientError):
    status = 405


class RequestTimeout(ClientError):
    status = 408


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
