"""The error tree: statuses, the OpenAI error shape, SSE error events, upstream-call failure translation."""

from __future__ import annotations

import orjson
import pytest

from pdproxy import client, errors
from pdproxy.errors import (
    CapsTaken,
    ClientError,
    Conflict,
    ExpectationFailed,
    Forbidden,
    HeadersTooLarge,
    InvalidRequest,
    LoopDetected,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    UpstreamBadResponse,
    UpstreamBadStatus,
    UpstreamConnectError,
    UpstreamError,
    UpstreamKvLost,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from pdproxy.proxy.calls import check_status, reruns_flow, translate

UPSTREAM = "http://10.0.0.1:8100"

# class -> (status, OpenAI type, retryable)
EXPECTED: dict[type[ProxyError], tuple[int, str, bool]] = {
    ProxyError: (500, "internal_error", False),
    ClientError: (400, "invalid_request_error", False),
    InvalidRequest: (400, "invalid_request_error", False),
    Unauthorized: (401, "authentication_error", False),
    Forbidden: (403, "permission_error", False),
    NotFound: (404, "invalid_request_error", False),
    ModelNotFound: (404, "NotFoundError", False),
    MethodNotAllowed: (405, "invalid_request_error", False),
    RequestTimeout: (408, "invalid_request_error", False),
    Conflict: (409, "invalid_request_error", False),
    TooManyRequests: (429, "rate_limit_error", False),
    PayloadTooLarge: (413, "invalid_request_error", False),
    UnsupportedMediaType: (415, "invalid_request_error", False),
    ExpectationFailed: (417, "invalid_request_error", False),
    HeadersTooLarge: (431, "invalid_request_error", False),
    Unavailable: (503, "service_unavailable", False),
    CapsTaken: (503, "service_unavailable", False),
    LoopDetected: (508, "loop_detected", False),
    UpstreamError: (502, "upstream_error", True),
    UpstreamConnectError: (502, "upstream_error", True),
    UpstreamBadStatus: (502, "upstream_error", True),
    UpstreamBadResponse: (502, "upstream_error", True),
    UpstreamTimeout: (504, "upstream_timeout", True),
    UpstreamKvLost: (502, "upstream_error", True),
    UpstreamStreamBroken: (502, "upstream_error", False),
}


def all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *all_subclasses(sub)}
    return found


def make(cls: type[ProxyError]) -> ProxyError:
    if cls is UpstreamKvLost:
        return UpstreamKvLost("it broke", upstream=UPSTREAM, blamed="http://10.0.0.2:8100")
    if issubclass(cls, UpstreamError):
        return cls("it broke", side="decode", upstream=UPSTREAM)
    return cls("it broke", param="prompt")


def test_every_error_class_is_covered() -> None:
    """A new error class must get its row here (and in the tree at the top of errors.py)."""
    tree = {c for c in all_subclasses(ProxyError) if c.__module__ == errors.__name__} | {ProxyError}
    assert tree - {UpstreamRejected} == set(EXPECTED)
    for cls in tree:
        assert cls.__name__ in errors.__doc__


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_status_and_openai_shape(cls: type[ProxyError]) -> None:
    status, error_type, retryable = EXPECTED[cls]
    error = make(cls)
    assert error.status == status
    assert error.retryable is retryable
    payload = orjson.loads(error.body())
    assert list(payload) == ["error"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"] == "it broke"
    assert payload["error"]["type"] == error_type
    assert payload["error"]["code"] == status
    expected_param = None if issubclass(cls, UpstreamError) else "prompt"
    assert payload["error"]["param"] == expected_param


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_response_carries_status_body_and_request_id(cls: type[ProxyError]) -> None:
    error = make(cls)
    response = error.response("req-42")
    assert response.status == EXPECTED[cls][0]
    assert response.content_type == "application/json"
    assert response.body == error.body()
    assert dict(response.headers)["X-Request-Id"] == "req-42"
    assert "X-Request-Id" not in dict(make(cls).response().headers)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_response_headers_are_pairs(cls: type[ProxyError]) -> None:
    error = make(cls)
    response = error.response("req-42")
    assert response.status == EXPECTED[cls][0]
    assert response.content_type == "application/json"
    assert response.body == error.body()
    assert ("X-Request-Id", "req-42") in response.headers
    assert all(name != "X-Request-Id" for name, _ in make(cls).response().headers)


def test_retry_after_and_www_authenticate_reach_response() -> None:
    assert ("Retry-After", "2") in Unavailable("full", retry_after=2).response().headers
    assert ("WWW-Authenticate", "Bearer") in Unauthorized("token").response().headers


def test_sides() -> None:
    assert InvalidRequest("x").side == "client"
    assert Unavailable("x").side == "internal"
    assert UpstreamTimeout("x", side="prefill", upstream=UPSTREAM).side == "prefill"
    assert UpstreamConnectError("x", side="decode", upstream=UPSTREAM).upstream == UPSTREAM
    assert Unavailable("x", side="decode").side == "decode"
    assert Unavailable("x").side == "internal"  # an instance override does not leak into the class


def test_kv_lost_surfaces_on_decode_and_blames_the_prefill_server() -> None:
    error = UpstreamKvLost("decode upstream could not load the KV blocks", upstream=UPSTREAM,
                           blamed="http://10.0.0.2:8100")
    assert (error.side, error.upstream, error.blamed, error.outcome) == (
        "decode", UPSTREAM, "http://10.0.0.2:8100", "kv_lost")
    assert isinstance(error, UpstreamError)


def test_message_with_quotes_and_unicode_is_valid_json() -> None:
    error = InvalidRequest('bad "prompt" — ünïcode\n', param="prompt")
    assert orjson.loads(error.body())["error"]["message"] == 'bad "prompt" — ünïcode\n'


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_sse_event(cls: type[ProxyError]) -> None:
    error = make(cls)
    event = error.sse_event()
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2  # one event, one line
    assert orjson.loads(event[len(b"data: "):-2]) == orjson.loads(error.body())


# ---------------------------------------------------------------- UpstreamRejected


@pytest.mark.parametrize(("status", "content_type", "payload"), [
    (400, "application/json", b'{"object":"error","message":"max_tokens too large","code":400}'),
    (422, "application/json; charset=utf-8", b'{"detail":[{"loc":["body","model"]}]}'),
    (404, "text/plain", b"Not Found"),
    (429, "text/html; charset=iso-8859-1", b"<h1>slow down</h1>"),
])
def test_upstream_rejected_relays_body_and_content_type(status: int, content_type: str, payload: bytes) -> None:
    error = UpstreamRejected(status, content_type, payload, UPSTREAM)
    assert error.status == status
    assert error.side == "client"
    assert error.retryable is False
    assert error.body() == payload
    assert error.sse_event() == b"data: " + payload + b"\n\n"
    response = error.response("req-9")
    assert response.status == status
    assert response.body == payload
    assert response.content_type == content_type
    assert dict(response.headers)["X-Request-Id"] == "req-9"
    assert "X-Request-Id" not in dict(error.response().headers)
    assert UPSTREAM in str(error)
    rendered = error.response("req-9")
    assert (rendered.status, rendered.body, rendered.content_type) == (status, payload, content_type)
    assert rendered.headers == (("X-Request-Id", "req-9"),)


# ---------------------------------------------------------------- translate (the upstream-call boundary)


@pytest.mark.parametrize("exc", [
    client.ResponseTimeout("no answer in time"),
    client.FirstByteTimeout("no first byte"),
    client.ConnectTimeout("no connection"),
    client.IdleTimeout("silent"),
], ids=type)
def test_timeouts_become_504(exc: client.CallError) -> None:
    error = translate(exc, side="prefill", upstream=UPSTREAM, stage="prefill")
    assert type(error) is UpstreamTimeout
    assert error.status == 504
    assert error.side == "prefill"
    assert error.upstream == UPSTREAM
    assert error.retryable is True
    assert UPSTREAM in error.message and "prefill" in error.message


def test_a_refused_connection_becomes_a_connect_error() -> None:
    error = translate(client.ConnectFailed("cannot connect: Connection refused"), side="decode", upstream=UPSTREAM,
                      stage="decode")
    assert type(error) is UpstreamConnectError
    assert (error.status, error.side, error.stage, error.retryable) == (502, "decode", "connect", True)
    assert UPSTREAM in error.message
    assert "Connection refused" in error.message


@pytest.mark.parametrize("exc", [client.BadResponse("garbage"), client.ResponseTooLarge("over 16 MiB")], ids=type)
def test_bad_answers_become_bad_responses(exc: client.CallError) -> None:
    error = translate(exc, side="prefill", upstream=UPSTREAM, stage="prefill")
    assert type(error) is UpstreamBadResponse
    assert error.status == 502 and error.retryable is True
    assert str(exc) in error.message


@pytest.mark.parametrize("exc", [client.ConnectionLost("closed mid-body"), client.CallError("")], ids=type)
def test_other_failures_become_connect_errors(exc: client.CallError) -> None:
    error = translate(exc, side="prefill", upstream=UPSTREAM, stage="read_body")
    assert type(error) is UpstreamConnectError
    assert error.status == 502
    assert error.side == "prefill"
    assert error.upstream == UPSTREAM
    assert "read body" in error.message
    assert error.message.strip()
    payload = orjson.loads(error.body())["error"]
    assert payload["code"] == 502 and payload["type"] == "upstream_error"


@pytest.mark.parametrize(("status", "kind"), [(200, None), (204, None), (301, UpstreamBadStatus),
                                                (404, UpstreamRejected), (429, UpstreamRejected),
                                                (500, UpstreamBadStatus), (503, UpstreamBadStatus)])
def test_check_status(status: int, kind: type[Exception] | None) -> None:
    if kind is None:
        check_status(status, "application/json", b"{}", side="decode", upstream=UPSTREAM)
        return
    with pytest.raises(kind) as info:
        check_status(status, "text/plain", b"nope", side="decode", upstream=UPSTREAM)
    if kind is UpstreamRejected:
        response = info.value.response("r1")
        assert (response.status, response.body, response.content_type) == (status, b"nope", "text/plain")


@pytest.mark.parametrize(("exc", "stage", "rerun"), [
    (client.ConnectFailed("refused"), "decode", True),
    (client.ConnectTimeout("slow handshake"), "decode", True),
    (client.ConnectionLost("dropped"), "decode", True),
    (client.FirstByteTimeout("quiet"), "decode_first_byte", False),
    (client.ResponseTimeout("long answer"), "decode_response", False),
    (client.BadResponse("garbage"), "decode", False),
])
def test_only_connect_errors_5xx_and_kv_load_errors_rerun_a_flow(exc: client.CallError, stage: str,
                                                                  rerun: bool) -> None:
    """A timeout after D accepted the request is not a retry; a refused or dropped connection is."""
    error = translate(exc, side="decode", upstream="http://d", stage=stage)
    assert reruns_flow(error) is rerun


def test_a_5xx_and_a_lost_kv_rerun_a_flow() -> None:
    with pytest.raises(errors.UpstreamBadStatus) as raised:
        check_status(503, "application/json", b"{}", side="decode", upstream="http://d")
    assert reruns_flow(raised.value)
    assert reruns_flow(errors.UpstreamKvLost("no KV", upstream="http://d", blamed="http://p"))
