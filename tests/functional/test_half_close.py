"""A client's FIN (shutdown(SHUT_WR)) while its request is served (probe finding F14), through the real proxy.

`--client-half-close abort` (the default): the client left, its prefill/decode is cancelled, nothing is answered.
`--client-half-close answer`: the FIN is a half-close, the answer is written, then the connection closes; a client
that really left is noticed at the first write that fails.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from pdproxy.mock import MockConfig
from tests.conftest import Cluster, ClusterFactory
from tests.unit.test_http_server import closed_by_server, read_reply

SLOW_PREFILL = MockConfig(role="prefill", ttft_ms=300)  # the FIN surely arrives while the request is served


def completion(stream: bool, max_tokens: int = 8) -> bytes:
    body = orjson.dumps({"model": "mock", "prompt": "half close", "max_tokens": max_tokens, "stream": stream})
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))


async def send_then_half_close(cluster: Cluster, stream: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(completion(stream))
    await cluster.wait_any_prefill()  # the handler runs: the prefill is on P
    writer.write_eof()  # shutdown(SHUT_WR), like nc -N
    return reader, writer


@pytest.mark.parametrize("stream", [False, True], ids=["non_streamed", "streamed"])
async def test_abort_by_default_a_half_closed_client_is_gone(cluster_factory: ClusterFactory, stream: bool) -> None:
    cluster = await cluster_factory(n_prefill=1, prefill_config=SLOW_PREFILL)
    reader, writer = await send_then_half_close(cluster, stream)
    try:
        assert await closed_by_server(reader) == b""  # no answer: the proxy read the FIN as a client that left
    finally:
        writer.close()
    await cluster.prefill[0].wait_idle()  # P's call was cancelled with the handler
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    assert cluster.prefill[0].stats.aborted == 1 and not cluster.decode[0].requests
    assert cluster.metric("pdproxy_client_disconnects_total", stage="prefill") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["non_streamed", "streamed"])
async def test_answer_a_half_closed_client_gets_its_whole_answer_then_a_close(cluster_factory: ClusterFactory,
                                                                             stream: bool) -> None:
    cluster = await cluster_factory(n_prefill=1, prefill_config=SLOW_PREFILL, client_half_close="answer")
    reader, writer = await send_then_half_close(cluster, stream)
    try:
        reply = await read_reply(reader, timeout=3)
        assert reply.status == 200, reply
        assert reply.headers["connection"] == "close"  # nothing more can be read from it: the last answer
        if stream:
            assert reply.headers["transfer-encoding"] == "chunked"
            assert reply.body.endswith(b"data: [DONE]\n\n") and reply.body.count(b'"text"') == 8
        else:
            assert orjson.loads(reply.body)["usage"]["completion_tokens"] == 8
        assert await closed_by_server(reader) == b""
    finally:
        writer.close()
    await asyncio.wait_for(cluster.flow.wait_idle(), 5)
    assert cluster.decode[0].stats.completed == 1 and cluster.prefill[0].stats.aborted == 0
    assert cluster.metric("pdproxy_client_disconnects_total", stage="prefill") == 0
    assert cluster.metric("pdproxy_requests_total", endpoint="/v1/completions", status="200") == 1


async def test_answer_a_client_that_really_left_ends_the_decode_at_the_first_failed_write(
        cluster_factory: ClusterFactory) -> None:
    """The cost of `answer`: a full close looks like a half-close until a write fails; then all is cancelled."""
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=20), client_half_close="answer")
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(completion(stream=True, max_tokens=500))  # 10 s of tokens
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()  # a full close: FIN, then the kernel answers the proxy's next bytes with a reset
    await writer.wait_closed()
    decode = cluster.decode[0]
    await decode.wait_until(lambda stats: stats.aborted == 1, timeout=3)  # far sooner than the 10 s stream
    await asyncio.wait_for(cluster.flow.wait_idle(), 3)
    assert decode.stats.completed == 0
    assert cluster.metric("pdproxy_client_disconnects_total", stage="decode") == 1
