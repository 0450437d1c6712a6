"""Every error path: a clear OpenAI-shaped error, the right status, and no leaked lease."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from pdproxy.http.limits import LARGE_BODY_BYTES
from pdproxy.http.parse_process import ParseProcess
from tests.conftest import Cluster, ClusterFactory, closed_port_url, sse_events

PROMPT = {"model": "mock", "prompt": "hello", "max_tokens": 4}


async def post(http: aiohttp.ClientSession, cluster: Cluster, body: Any = PROMPT, path: str = "/v1/completions",
               **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(cluster.url + path, json=body, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


def assert_openai_error(payload: dict[str, Any], status: int, contains: str) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert contains in error["message"], error["message"]


# -- the client's mistakes ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "raw", "contains", "param"),
    [
        ("/v1/completions", b"{not json", "not valid JSON", None),
        ("/v1/completions", b"", "body is empty", None),
        ("/v1/completions", b"[1, 2]", "must be a JSON object", None),
        ("/v1/completions", b'{"model": "m"}', "'prompt' is required", "prompt"),
        ("/v1/completions", b'{"prompt": 7}', "'prompt' must be a string", "prompt"),
        ("/v1/completions", b'{"prompt": ["a", []]}', "each prompt of a batch", "prompt"),
        ("/v1/completions", b'{"prompt": [[1, 2], ["x"]]}', "each prompt of a batch", "prompt"),
        ("/v1/completions", b'{"prompt": []}', "'prompt' must be a string", "prompt"),
        ("/v1/completions", b'{"prompt": "a", "stream": "yes"}', "'stream' must be true or false", "stream"),
        ("/v1/completions", b'{"prompt": "a", "n": 17}', "at most 16 per request", "n"),
        ("/v1/completions", b'{"prompt": ["a", "b"], "n": 9}', "at most 16 per request", "n"),
        ("/v1/completions", b'{"prompt": "a", "n": 0}', "'n' must be a positive integer", "n"),
        ("/v1/completions", b'{"prompt": "a", "best_of": 3}', "'best_of' > 1", "best_of"),
        ("/v1/completions", b'{"prompt": "a", "n": "2"}', "'n' must be a positive integer", "n"),
        ("/v1/chat/completions", b'{"model": "m"}', "'messages' is required", "messages"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "non-empty list", "messages"),
        ("/v1/chat/completions", b'{"messages": []}', "non-empty list", "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', "string 'role'", "messages[0]"),
    ],
)
async def test_bad_requests_get_400(cluster: Cluster, http: aiohttp.ClientSession, path: str, raw: bytes,
                                    contains: str, param: str | None) -> None:
    async with http.post(cluster.url + path, data=raw, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        payload = await resp.json()
    assert_openai_error(payload, 400, contains)
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"
    assert not any(e.requests for e in [*cluster.prefill, *cluster.decode])  # nothing went upstream
    assert cluster.metric("pdproxy_requests_total", endpoint=path, status="400") == 1


async def test_single_prompt_forms_are_accepted(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    for prompt in ("text", [1, 2, 3], ["text"], [[1, 2, 3]]):
        status, payload = await post(http, cluster, {"model": "mock", "prompt": prompt, "max_tokens": 2})
        assert status == 200, payload


async def test_body_over_the_limit_gets_413(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(max_body_bytes=4096)
    status, payload = await post(http, cluster, {"model": "mock", "prompt": "x" * 5000})
    assert status == 413
    assert_openai_error(payload, 413, "larger than the limit of 4096 bytes")

    async def chunked():  # no Content-Length: the limit holds while reading too
        yield b'{"prompt": "' + b"x" * 8000 + b'"}'

    async with http.post(cluster.url + "/v1/completions", data=chunked()) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), 413, "larger than the limit")


async def test_unknown_route_404_and_wrong_method_405(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.get(cluster.url + "/v1/nope") as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), 404, "unknown route: GET /v1/nope")
    async with http.get(cluster.url + "/v1/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert_openai_error(await resp.json(), 405, "method GET is not allowed on /v1/completions")


# -- prefill failures ----------------------------------------------------------------------------

async def test_prefill_connect_error_fails_over(cluster_factory: ClusterFactory,
                                                http: aiohttp.ClientSession) -> None:
    dead = closed_port_url()
    # round_robin tries the first listed server first: the dead one.
    cluster = await cluster_factory(n_prefill=1, extra_prefill=(dead,), prefill_policy="round_robin")
    status, payload = await post(http, cluster)
    assert status == 200, payload
    assert cluster.metric("pdproxy_prefill_retries_total") == 1
    assert "cannot connect" in (cluster.upstream(dead).last_error or "")
    assert cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=dead,
                          outcome="connect_error") == 1


async def test_all_prefill_servers_refusing_connections_gives_503_with_retry_after(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    """Every P down before the health checks noticed: every attempt failed to connect, so the answer is
    503 + Retry-After (try again shortly), not 502 (a bad answer from an upstream)."""
    cluster = await cluster_factory(n_prefill=0, extra_prefill=(closed_port_url(), closed_port_url()),
                                    eject_after=0)
    async with http.post(cluster.url + "/v1/completions", json=PROMPT) as resp:
        status, payload, retry_after = resp.status, await resp.json(), resp.headers.get("Retry-After")
    assert status == 503
    assert retry_after == "1"
    assert_openai_error(payload, 503, "no prefill upstream reachable: 2 attempt(s) failed to connect")
    assert "cannot connect to prefill upstream" in payload["error"]["message"]
    assert payload["error"]["type"] == "service_unavailable"
    assert not cluster.decode[0].requests
    for url in cluster.prefill_urls:  # each refusal still counts against its P
        assert cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=url,
                              outcome="connect_error") == 1


async def test_prefill_servers_killed_give_503_then_recover(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(n_prefill=2, eject_after=0)
    for engine in list(cluster.prefill):
        await cluster.kill(engine)
    async with http.post(cluster.url + "/v1/completions", json=PROMPT) as resp:
        assert resp.status == 503
        assert resp.headers.get("Retry-After") == "1"
    await cluster.revive(cluster.prefill[0])
    status, payload = await post(http, cluster)
    assert status == 200, payload


async def test_one_refusal_and_one_500_is_still_a_502(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    """503 only when every attempt failed to connect: a P that answered 500 makes it the upstream's bad answer."""
    cluster = await cluster_factory(n_prefill=1, extra_prefill=(closed_port_url(),), prefill_policy="round_robin",
                                    eject_after=0)
    cluster.prefill[0].fail_next(500)
    status, payload = await post(http, cluster)
    assert status == 502
    assert "answered 500" in payload["error"]["message"]
    assert [len(e.requests) for e in cluster.prefill] == [1]


@pytest.mark.parametrize("fault", ["fail_next", "garbage_next", "drop_next"])
async def test_prefill_failure_is_retried_on_another_server(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, fault: str
) -> None:
    cluster = await cluster_factory(prefill_policy="round_robin")
    getattr(cluster.prefill[0], fault)()
    status, payload = await post(http, cluster)
    assert status == 200, payload
    assert [len(e.requests) for e in cluster.prefill] == [1, 1]
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


@pytest.mark.parametrize(("fault", "contains"), [
    ("fail_next", "answered 500"),
    ("garbage_next", "not a JSON object"),
    ("drop_next", "prefill upstream"),
])
async def test_prefill_failing_everywhere_gives_502(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession, fault: str, contains: str
) -> None:
    cluster = await cluster_factory(n_prefill=3, prefill_retries=2)
    for engine in cluster.prefill:
        getattr(engine, fault)()
    status, payload = await post(http, cluster)
    assert status == 502
    assert_openai_error(payload, 502, contains)
    assert [len(e.requests) for e in cluster.prefill] == [1, 1, 1]  # each server tried once
    assert cluster.metric("pdproxy_prefill_retries_total") == 2


async def test_prefill_retries_are_bounded(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=3, prefill_retries=1)
    for engine in cluster.prefill:
        engine.fail_next(503)
    status, _ = await post(http, cluster)
    assert status == 502
    assert sum(len(e.requests) for e in cluster.prefill) == 2


async def test_prefill_timeout_fails_over_then_504(cluster_factory: ClusterFactory,
                                                   http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(prefill_timeout=0.2, prefill_policy="round_robin")
    cluster.prefill[0].hang_next()
    status, payload = await post(http, cluster)
    assert status == 200, payload
    for engine in cluster.prefill:
        engine.hang_next()
    status, payload = await post(http, cluster)
    assert status == 504
    assert_openai_error(payload, 504, "timed out")
    assert payload["error"]["type"] == "upstream_timeout"
    assert cluster.metric("pdproxy_timeouts_total", stage="prefill") == 1


async def test_prefill_4xx_is_relayed_unchanged_and_not_retried(cluster: Cluster,
                                                                 http: aiohttp.ClientSession) -> None:
    body = b'{"object":"error","message":"This model\'s maximum context length is 8192 tokens","code":400}'
    for engine in cluster.prefill:
        engine.fail_next(400, body=body)
    async with http.post(cluster.url + "/v1/completions", json=PROMPT, headers={"X-Request-Id": "r4"}) as resp:
        assert resp.status == 400
        assert await resp.read() == body
        assert resp.headers["X-Request-Id"] == "r4"
    assert sum(len(e.requests) for e in cluster.prefill) == 1
    assert not cluster.decode[0].requests
    assert cluster.metric("pdproxy_prefill_retries_total") == 0


# -- decode failures -----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "contains"), [
    ("fail_next", "decode upstream"),
    ("drop_next", "decode upstream"),
    ("lose_kv_next", "decode upstream"),
])
async def test_decode_failing_before_its_first_byte_twice_gives_502(
    cluster: Cluster, http: aiohttp.ClientSession, fault: str, contains: str, stream: bool
) -> None:
    getattr(cluster.decode[0], fault)(times=2)  # the first try and the whole-flow rerun
    status, payload = await post(http, cluster, PROMPT | {"stream": stream})
    assert status == 502
    assert_openai_error(payload, 502, contains)
    assert len(cluster.decode[0].requests) == 2
    assert cluster.metric("pdproxy_flow_retries_total") == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["fail_next", "drop_next", "lose_kv_next"])
async def test_the_only_decode_failing_once_is_rerun_with_a_fresh_prefill(
    cluster: Cluster, http: aiohttp.ClientSession, fault: str, stream: bool
) -> None:
    """With one D, the rerun goes to the same D: a lost KV (P died, or freed it) needs only a new prefill."""
    getattr(cluster.decode[0], fault)()
    async with http.post(cluster.url + "/v1/completions", json=PROMPT | {"stream": stream}) as resp:
        assert resp.status == 200
        text = await resp.read()
    assert b'"error"' not in text
    assert sum(len(e.requests) for e in cluster.prefill) == 2
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1
    assert cluster.metric("pdproxy_flow_retries_total") == 1


async def test_no_flow_retries_means_one_decode_attempt(cluster_factory: ClusterFactory,
                                                        http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(flow_retries=0)
    cluster.decode[0].lose_kv_next()
    status, payload = await post(http, cluster, PROMPT | {"stream": True})
    assert status == 502
    assert_openai_error(payload, 502, "answered with an error event")
    assert sum(len(e.requests) for e in cluster.prefill) == 1


async def test_decode_unreachable_gives_502(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=0, extra_decode=(closed_port_url(),))
    status, payload = await post(http, cluster)
    assert status == 502
    assert_openai_error(payload, 502, "cannot connect to decode upstream")


async def test_decode_4xx_is_relayed_unchanged(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    cluster.decode[0].fail_next(422, body=b'{"detail": "unprocessable"}')
    async with http.post(cluster.url + "/v1/completions", json=PROMPT | {"stream": True}) as resp:
        assert resp.status == 422
        assert await resp.read() == b'{"detail": "unprocessable"}'


async def test_decode_dying_mid_stream_ends_with_an_sse_error_event(cluster: Cluster,
                                                                    http: aiohttp.ClientSession) -> None:
    cluster.decode[0].die_after(2)
    async with http.post(cluster.url + "/v1/completions", json=PROMPT | {"max_tokens": 16, "stream": True}) as resp:
        assert resp.status == 200
        events = sse_events(await resp.read())
    assert len(events) == 3
    assert [orjson.loads(e)["choices"][0]["text"] for e in events[:2]] == [" tok0", " tok1"]
    error = orjson.loads(events[-1])["error"]
    assert "decode stream broke" in error["message"] and error["code"] == 502
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=cluster.decode_urls[0],
                          outcome="broken") == 1


async def test_decode_stalling_mid_stream_times_out_with_an_sse_error_event(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(stream_idle_timeout=0.2)
    cluster.decode[0].stall_after(1)
    async with http.post(cluster.url + "/v1/completions", json=PROMPT | {"stream": True}) as resp:
        events = sse_events(await resp.read())
    assert len(events) == 2
    assert orjson.loads(events[-1])["error"]["message"] == "decode stream broke: stream idle timeout (0.2s)"
    assert cluster.metric("pdproxy_timeouts_total", stage="stream_idle") == 1


async def test_no_routable_upstream_fails_fast_with_503(cluster_factory: ClusterFactory,
                                                         http: aiohttp.ClientSession) -> None:
    from pdproxy.upstreams import State

    cluster = await cluster_factory(healthy_panic_threshold=0)  # in panic, unhealthy members would be tried
    for upstream in cluster.flow.decode_pool.members:
        upstream.state = State.UNHEALTHY
    status, payload = await post(http, cluster)
    assert status == 503
    assert_openai_error(payload, 503, "no routable decode upstream")
    assert not any(e.requests for e in cluster.prefill)  # no prefill whose KV no decoder could take
    async with http.get(cluster.url + "/health") as resp:
        assert resp.status == 503
        assert (await resp.json())["reason"] == "no routable decode upstream"
    for upstream in cluster.flow.decode_pool.members:
        upstream.state = State.HEALTHY
    for upstream in cluster.flow.prefill_pool.members:
        upstream.state = State.UNHEALTHY
    async with http.post(cluster.url + "/v1/completions", json=PROMPT) as resp:
        assert resp.status == 503
        assert resp.headers.get("Retry-After") == "1"
        assert_openai_error(await resp.json(), 503, "no routable prefill upstream")


async def test_a_lost_kv_is_blamed_on_the_prefill_server_not_the_decode_server(
        cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    """D's first event says it could not load the KV P made: P's fault (it died or freed it), never D's."""
    cluster = await cluster_factory(eject_after=1, health_interval=0, flow_retries=0, prefill_policy="round_robin",
                                    n_prefill=3)
    cluster.decode[0].lose_kv_next()
    status, payload = await post(http, cluster, PROMPT | {"stream": True})
    assert status == 502
    assert_openai_error(payload, 502, "error event before any token")
    blamed = next(url for url, engine in zip(cluster.prefill_urls, cluster.prefill, strict=True) if engine.requests)
    d = cluster.decode_urls[0]
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=d, outcome="kv_lost") == 1
    assert cluster.metric("pdproxy_upstream_requests_total", role="prefill", upstream=blamed, outcome="kv_lost") == 1
    assert cluster.upstream(d).state.value == "unknown" and cluster.upstream(d).last_error is None
    assert cluster.upstream(blamed).state.value == "ejected"  # eject_after=1: the strike went to P


async def test_large_bodies_are_parsed_off_the_loop_with_the_same_answers(
        cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """Bodies of LARGE_BODY_BYTES and more go through the parse process (http/parse_process.py): a valid one is
    served whole, a broken one is the same 400 as a small one, and the helper is gone after the proxy's cleanup."""
    prompt = "x" * (LARGE_BODY_BYTES + 1000)
    status, payload = await post(http, cluster, {"model": "mock", "prompt": prompt, "max_tokens": 2})
    assert status == 200, payload
    assert [r.body["prompt"] == prompt for r in [*cluster.prefill[0].requests, *cluster.prefill[1].requests,
                                                  *cluster.decode[0].requests]].count(True) == 2  # P and D
    for raw, contains in ((b'{"prompt": "' + b"x" * LARGE_BODY_BYTES, "not valid JSON"),
                          (b"[" + b"1," * (LARGE_BODY_BYTES // 2) + b"1]", "must be a JSON object")):
        async with http.post(cluster.url + "/v1/completions", data=raw,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json(), 400, contains)
    parser = next(s for s in cluster.app.services if isinstance(s, ParseProcess))  # type: ignore[attr-defined]
    process = parser._process
    assert parser.started == 1 and process is not None and process.returncode is None
    await cluster.app.cleanup()
    assert process.returncode is not None  # killed with the app
