"""Malformed HTTP against the real proxy on raw sockets (issue 15 item 8): each shape gets its 4xx in OpenAI's
error shape and a close, the proxy stays healthy, nothing reaches an engine, and nothing is logged as an ERROR.

The server-internal sides (rate-limited warnings, a malformed request pipelined behind a running handler, the
server's own limits) stay in tests/unit/test_http_server.py. Runs on asyncio and uvloop (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from tests.conftest import Cluster, ClusterFactory
from tests.unit.test_http_server import Reply, closed_by_server, read_reply

BODY = orjson.dumps({"model": "mock", "prompt": "hi", "max_tokens": 2})
POST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
GOOD = POST + b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)

# shape -> (raw request, expected status)
SHAPES: dict[str, tuple[bytes, int]] = {
    "cl_and_te": (POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_and_cl": (POST + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY), 400),
    "two_content_lengths": (POST + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n%b" % (len(BODY), BODY), 400),
    "same_content_length_twice": (POST + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n%b"
                                  % (len(BODY), len(BODY), BODY), 400),
    "content_length_list": (POST + b"Content-Length: %d, %d\r\n\r\n%b" % (len(BODY), len(BODY), BODY), 400),
    "negative_length": (POST + b"Content-Length: -1\r\n\r\n", 400),
    "overflowing_length": (POST + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    "te_not_chunked": (POST + b"Transfer-Encoding: gzip\r\n\r\n" + BODY, 400),
    "te_chunked_twice": (POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "invalid_chunk_size": (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    "overflowing_chunk_size": (POST + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nabc\r\n", 400),
    "chunk_without_crlf": (POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n", 400),
    "obs_fold": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Test: a\r\n  folded\r\n\r\n", 400),
    "bare_cr": (b"GET /health HTTP/1.1\r\nHost: x\rX-Test: a\r\n\r\n", 400),
    "bare_lf_in_value": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Test: a\nb\r\n\r\n", 400),
    "bare_lf_line_ends": (POST.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n%b" % (len(BODY), BODY), 400),
    "nul_in_header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Test: a\x00b\r\n\r\n", 400),
    "nul_in_url": (b"GET /v1/comp\x00letions HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "space_before_colon": (POST + b"Content-Length : %d\r\n\r\n%b" % (len(BODY), BODY), 400),
    "bad_version": (b"GET /health HTTP/7.3\r\nHost: x\r\n\r\n", 400),
    "unknown_method": (b"FROB /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "lowercase_method": (b"post /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400),
    "tls_on_the_plain_port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello tls\r\n\r\n", 400),
    "huge_header_line": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", 431),
    "ten_thousand_headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n"
                             + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n", 431),
    "one_mib_url": (b"GET /health?" + b"q" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    "body_over_the_limit": (POST + b"Content-Length: %d\r\n\r\n" % (200 << 20), 413),
    "unsupported_expect": (POST + b"Expect: 200-ok\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY), 417),
    "unknown_content_encoding": (POST + b"Content-Encoding: br\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(BODY), BODY), 415),
    "not_gzip_but_says_so": (POST + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(BODY), BODY), 400),
}

# refused by llhttp itself: each logs one rate-limited WARNING line
PARSER_SHAPES = {name for name, (_, status) in SHAPES.items() if status == 400} - {"not_gzip_but_says_so"}


def assert_engines_saw_nothing(cluster: Cluster) -> None:
    for engine in [*cluster.prefill, *cluster.decode]:
        assert engine.requests == [], [r.path for r in engine.requests]


async def exchange(cluster: Cluster, *pieces: bytes) -> tuple[Reply, bytes, asyncio.StreamReader]:
    """Send the pieces (each its own write, yielding between them) on a fresh connection; the first reply."""
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        reply = await read_reply(reader, timeout=3)
        rest = await closed_by_server(reader, timeout=3)
    finally:
        writer.close()
    return reply, rest, reader


async def assert_healthy(cluster: Cluster) -> None:
    reply, _, _ = await exchange(cluster, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.status == 200 and orjson.loads(reply.body)["status"] == "ok"


def assert_error_shape(reply: Reply, status: int) -> None:
    assert reply.status == status, reply
    error = orjson.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert reply.headers["connection"] == "close"


@pytest.fixture
async def lone(cluster_factory: ClusterFactory) -> Cluster:
    """One P and one D behind the proxy; the engines' request logs must stay empty."""
    return await cluster_factory(n_prefill=1, health_interval=0)


@pytest.fixture
def no_errors(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    yield caplog
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_each_malformed_shape_gets_its_4xx_and_a_close(lone: Cluster, no_errors: pytest.LogCaptureFixture,
                                                             shape: str) -> None:
    raw, status = SHAPES[shape]
    reply, rest, _ = await exchange(lone, raw)
    assert_error_shape(reply, status)
    assert rest == b""  # nothing after the refusal: the connection closed, no second answer smuggled in
    await assert_healthy(lone)
    assert_engines_saw_nothing(lone)
    seen = [(r.name, r.levelno, r.exc_info) for r in no_errors.records]
    if shape in PARSER_SHAPES:  # one WARNING line, never a traceback (its rate limit: tests/unit)
        assert seen == [("pdproxy.http", logging.WARNING, None)], seen
    else:
        assert len(seen) <= 1 and all(level == logging.WARNING and not exc for _, level, exc in seen), seen
    refusals = sum(lone.metric("pdproxy_client_refusals_total", reason=reason)
                   for reason in ("malformed", "headers_too_large", "too_large"))
    assert refusals == 1


async def test_a_smuggled_request_in_the_body_is_never_served(lone: Cluster,
                                                              no_errors: pytest.LogCaptureFixture) -> None:
    """CL.TE: a front that used Content-Length would hide a second request in the chunked body."""
    hidden = b"GET /admin/upstreams HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = POST + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%b" % (5 + len(hidden), hidden)
    reply, rest, _ = await exchange(lone, raw)
    assert_error_shape(reply, 400)
    assert rest == b"" and b"upstreams" not in reply.body
    assert_engines_saw_nothing(lone)


async def test_bad_chunk_size_in_a_later_packet_than_the_headers(lone: Cluster,
                                                                 no_errors: pytest.LogCaptureFixture) -> None:
    """The probe saw this hang for 40 s behind a handler waiting for the body: now a 400 at once."""
    reply, rest, _ = await exchange(lone, POST + b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n",
                                    b"nothex\r\n")
    assert_error_shape(reply, 400)
    assert rest == b""
    assert_engines_saw_nothing(lone)


async def test_wrong_methods_get_405_with_allow_and_the_connection_stays_usable(
        lone: Cluster, no_errors: pytest.LogCaptureFixture) -> None:
    host, port = lone.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for method, path in ((b"GET", b"/v1/completions"), (b"DELETE", b"/v1/chat/completions"),
                             (b"PUT", b"/health")):
            writer.write(b"%b %b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % (method, path))
            reply = await read_reply(reader, timeout=3)
            assert reply.status == 405 and "allow" in reply.headers, reply
            assert set(orjson.loads(reply.body)["error"]) == {"message", "type", "param", "code"}
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a well-formed refusal keeps the connection
        assert (await read_reply(reader, timeout=3)).status == 200
    finally:
        writer.close()
    assert_engines_saw_nothing(lone)


async def test_pipelined_garbage_after_a_good_request(lone: Cluster, no_errors: pytest.LogCaptureFixture) -> None:
    """The good request is served (one prefill, one decode), the garbage after it gets 400 and a close."""
    host, port = lone.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(GOOD + b"\x00\x01GARBAGE / HTTP/9\r\n\r\n")
        first = await read_reply(reader, timeout=3)
        assert first.status == 200 and orjson.loads(first.body)["choices"], first
        assert "connection" not in first.headers
        second = await read_reply(reader, timeout=3)
        assert_error_shape(second, 400)
        assert await closed_by_server(reader, timeout=3) == b""
    finally:
        writer.close()
    assert len(lone.prefill[0].requests) == 1 and len(lone.decode[0].requests) == 1
    await assert_healthy(lone)


async def test_headers_under_both_limits_are_served(lone: Cluster, no_errors: pytest.LogCaptureFixture) -> None:
    """The other side of the 431 shapes: 100 headers and a 32 KiB header line are fine (defaults 128, 64 KiB)."""
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    reply, _, _ = await exchange(lone, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + many
                                 + b"X-Big: " + b"a" * (32 << 10) + b"\r\n\r\n")
    assert reply.status == 200
