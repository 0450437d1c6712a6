"""Property-based fuzz of request bodies and headers against the real proxy and mock engines (issue 15 item 8):
the PD routes, and bodies on the tokens-in and pass-through routes.

The property, for every input: the answer is 2xx or 4xx (never a 5xx caused by the input; the engines are healthy
throughout), it is framed correctly, nothing is logged as an ERROR or with a traceback, and once it is answered
nothing is in flight. One proxy serves all examples of a test (a fresh connection each), so state leaking from
one input into the next would show too.

Bounded and deterministic by default (`derandomize`, no example database, no deadline: the machine is shared), so
CI runs the same examples every time in a few seconds. `PDPROXY_FUZZ_EXAMPLES=2000 PDPROXY_FUZZ_RANDOM=1` runs a
longer, random search locally.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Cluster, ClusterFactory
from tests.unit.test_http_server import Reply, read_reply

FUZZ = settings(
    max_examples=int(os.environ.get("PDPROXY_FUZZ_EXAMPLES", "200")),
    derandomize=os.environ.get("PDPROXY_FUZZ_RANDOM") != "1",
    database=None,
    deadline=None,
    # one proxy for all examples on purpose (see the module docstring)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
# the other POST routes with a body: the tokens-in PD route and pass-through routes (the mock may answer 404)
OTHER_ROUTES = ("/inference/v1/generate", "/v1/responses", "/v1/embeddings", "/tokenize", "/v1/messages")

# ---- strategies ---------------------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24))
json_values = scalars | st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
small_counts = st.integers(min_value=-3, max_value=40)
token_ids = st.lists(st.integers(min_value=-5, max_value=2**40), max_size=8)
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(("user", "system", "assistant", "tool")) | json_values,
    "content": st.text(max_size=40) | json_values,
    "name": st.text(max_size=8),
}) | json_values, max_size=3)

# the fields the proxy or the engines read, each with plausible and hostile values; plus unknown ones
FIELDS = {
    "model": st.just("mock") | json_values,
    "prompt": st.text(max_size=60) | token_ids | st.lists(st.text(max_size=8) | token_ids, max_size=3) | json_values,
    "messages": messages,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values})
    | json_values,
    "max_tokens": small_counts | json_values,
    "max_completion_tokens": small_counts | json_values,
    "n": small_counts | json_values,
    "best_of": small_counts | json_values,
    "temperature": st.floats(allow_nan=False, allow_infinity=False) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
    "kv_transfer_params": json_values,
    "logprobs": json_values,
    "echo": json_values,
    "user": json_values,
}
body_objects = st.builds(lambda extra, known: {**extra, **known},
                         st.dictionaries(st.text(max_size=10), json_values, max_size=3),
                         st.fixed_dictionaries({}, optional=FIELDS))

# past the proxy's own checks (a prompt and messages, so either endpoint takes it): the other fields, hostile
# or not, reach the engines; what they refuse must come back as a 4xx, never a 5xx
VALID_BASE = {"model": "mock", "prompt": "fuzz", "messages": [{"role": "user", "content": "fuzz"}], "max_tokens": 4}
valid_objects = st.builds(
    lambda stream, fields: {**VALID_BASE, "stream": stream, **fields}, st.booleans(),
    st.lists(st.one_of([st.tuples(st.just(name), value) for name, value in FIELDS.items()
                        if name not in ("prompt", "messages", "n", "best_of")]), max_size=2).map(dict))


def nested(depth: int) -> bytes:
    return b'{"prompt": "x", "x": ' + b"[" * depth + b"]" * depth + b"}"


valid_bodies = st.builds(lambda value: json.dumps(value).encode(), valid_objects)
hostile_bodies = (
    st.builds(lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode(), body_objects,
              st.booleans())
    | st.builds(lambda value: json.dumps(value).encode(), json_values)  # any JSON, not only objects
    | st.integers(min_value=1, max_value=1100).map(nested)  # orjson's depth limits are 254 (dumps) and 1024
    | st.binary(max_size=64)
    | st.builds(lambda value, cut: json.dumps(value).encode()[:cut], body_objects, st.integers(0, 40))  # truncated
)
# weighted: over half of the inputs get past the proxy's own checks, so the engines' side is fuzzed too
raw_bodies = st.integers(0, 9).flatmap(lambda pick: valid_bodies if pick < 6 else hostile_bodies)

header_names = st.sampled_from((
    "X-Request-Id", "Content-Type", "Authorization", "Via", "Content-Encoding", "Accept", "Accept-Encoding",
    "Connection", "traceparent", "tracestate", "User-Agent", "X-Forwarded-For", "Expect", "Cookie", "Host",
    "Upgrade", "Transfer-Encoding", "Content-Length", "Keep-Alive", "TE", "Trailer", "Forwarded",
)) | st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}\Z")
# any byte a header value may carry on the wire (control characters and CR/LF are test_malformed_http's shapes)
header_values = st.binary(max_size=48).map(lambda raw: bytes(b for b in raw if b == 9 or 32 <= b != 127)
                                            .strip(b" \t"))
headers_lists = st.lists(st.tuples(header_names, header_values), max_size=6)

# ---- the exchange and the property --------------------------------------------------------------------------------


async def send(cluster: Cluster, path: str, body: bytes, headers: list[tuple[str, bytes]]) -> Reply:
    """One request on a fresh raw connection (so any header bytes go as they are); its final answer."""
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = b"POST %b HTTP/1.1\r\nHost: pdproxy\r\n" % path.encode()
    head += b"".join(b"%b: %b\r\n" % (name.encode(), value) for name, value in headers)
    if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        head += b"Content-Length: %d\r\n" % len(body)
    try:
        writer.write(head + b"\r\n" + body)
        reply = await read_reply(reader, timeout=5)
        while 100 <= reply.status < 200:  # Expect: 100-continue; the final answer follows
            reply = await read_reply(reader, timeout=5)
        return reply
    finally:
        writer.close()


async def check_property(cluster: Cluster, reply: Reply, what: Any, *, completion: bool = True) -> None:
    """`completion`: the answer must be a completion (else any JSON or event stream of the route)."""
    assert 200 <= reply.status < 500, (reply.status, reply.body[:300], what)
    if reply.status >= 400:
        error = json.loads(reply.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, (reply.body[:300], what)
    elif not completion:
        assert reply.body or reply.status == 204, what
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        assert reply.body.endswith(b"data: [DONE]\n\n"), (reply.body[-300:], what)
        assert b'"error"' not in reply.body, (reply.body[-300:], what)  # a healthy engine's stream ends clean
    else:
        assert json.loads(reply.body)["choices"], (reply.body[:300], what)
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    leaked = {u.url: u.in_flight for u in cluster.upstreams() if u.in_flight}
    assert not leaked and cluster.flow.in_flight == 0, (leaked, what)


@pytest.fixture
async def fuzzed(cluster_factory: ClusterFactory, caplog: pytest.LogCaptureFixture) -> Any:
    """One proxy for all examples; after them: it is still healthy and its log has no ERROR and no traceback."""
    caplog.set_level(logging.WARNING)
    cluster = await cluster_factory(n_prefill=1, health_interval=0)
    yield cluster
    async with asyncio.timeout(5):
        host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_reply(reader)).status == 200
        writer.close()
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), body=raw_bodies)
async def test_fuzzed_bodies_get_2xx_or_4xx(fuzzed: Cluster, path: str, body: bytes) -> None:
    reply = await send(fuzzed, path, body, [("Content-Type", b"application/json")])
    await check_property(fuzzed, reply, body[:300])


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), stream=st.booleans(), headers=headers_lists)
async def test_fuzzed_headers_get_2xx_or_4xx(fuzzed: Cluster, path: str, stream: bool,
                                             headers: list[tuple[str, bytes]]) -> None:
    body = {"model": "mock", "max_tokens": 4, "stream": stream}
    body.update({"prompt": "fuzz"} if path == ENDPOINTS[0] else {"messages": [{"role": "user", "content": "fuzz"}]})
    reply = await send(fuzzed, path, json.dumps(body).encode(), headers)
    await check_property(fuzzed, reply, headers)


@FUZZ
@given(path=st.sampled_from(OTHER_ROUTES), body=raw_bodies)
async def test_fuzzed_bodies_on_the_other_routes_get_2xx_or_4xx(fuzzed: Cluster, path: str, body: bytes) -> None:
    reply = await send(fuzzed, path, body, [("Content-Type", b"application/json")])
    await check_property(fuzzed, reply, (path, body[:300]), completion=False)
