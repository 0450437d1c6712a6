"""Batched prompts and n > 1 through PD: one flow per (prompt, sample), merged as vLLM answers.

The mock engines run with `distinct_text`: each answer depends on its prompt and seed, so the merged
answer is checked choice by choice against what the same proxy answers for that prompt (and seed) alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from pdproxy.mock import MockConfig
from tests.conftest import Cluster, ClusterFactory, sse_events

PROMPTS = ["the quick brown fox", "jumps over the lazy dog", "and runs away"]


async def distinct_cluster(factory: ClusterFactory, n_prefill: int = 2, decode: MockConfig | None = None,
                           **settings: Any) -> Cluster:
    return await factory(n_prefill, prefill_config=MockConfig(role="prefill", distinct_text=True),
                         decode_config=decode or MockConfig(role="decode", distinct_text=True), **settings)


async def post(http: aiohttp.ClientSession, cluster: Cluster, body: dict[str, Any],
               path: str = "/v1/completions") -> tuple[int, dict[str, Any]]:
    async with http.post(cluster.url + path, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def stream_events(http: aiohttp.ClientSession, cluster: Cluster, body: dict[str, Any],
                        path: str = "/v1/completions") -> list[bytes]:
    async with http.post(cluster.url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return sse_events(await resp.read())


async def alone(http: aiohttp.ClientSession, cluster: Cluster, body: dict[str, Any],
                path: str = "/v1/completions") -> dict[str, Any]:
    """The answer to one prompt, one sample: the proxy's plain path."""
    status, payload = await post(http, cluster, body, path)
    assert status == 200, payload
    assert len(payload["choices"]) == 1
    return payload


def expected(body: dict[str, Any], prompts: list[Any], n: int) -> list[dict[str, Any]]:
    """The single-prompt bodies of choices 0 .. len(prompts)*n-1 (seed + j for sample j)."""
    bodies = []
    for prompt in prompts:
        for j in range(n):
            one = {**body, "prompt": prompt}
            one.pop("n", None)
            one.pop("stream_options", None)  # asked for non-streamed
            if "seed" in body:
                one["seed"] = body["seed"] + j
            bodies.append(one)
    return bodies


def decoded_with_handle(cluster: Cluster) -> int:
    return sum(e.stats.decodes_with_valid_handle for e in cluster.decode)


async def test_batch_of_three_prompts_matches_each_prompt_alone(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    body = {"model": "mock", "prompt": PROMPTS, "max_tokens": 5}
    status, merged = await post(http, cluster, body)
    assert status == 200, merged
    assert decoded_with_handle(cluster) == 3  # three PD flows, each with P's handle
    singles = [await alone(http, cluster, one) for one in expected(body, PROMPTS, 1)]
    assert [c["index"] for c in merged["choices"]] == [0, 1, 2]
    assert [c["text"] for c in merged["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert len({c["text"] for c in merged["choices"]}) == 3  # the prompts' answers differ: order is checked
    assert merged["object"] == "text_completion" and "kv_transfer_params" not in merged
    prompt_tokens = sum(s["usage"]["prompt_tokens"] for s in singles)
    details = merged["usage"].pop("prompt_tokens_details")  # P's cached tokens, summed per prompt
    assert details == {"cached_tokens": 0}  # the first time P saw these prompts
    assert merged["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 15,
                               "total_tokens": prompt_tokens + 15}


async def test_batch_with_n3_non_streamed(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    body = {"model": "mock", "prompt": PROMPTS, "n": 3, "seed": 40, "max_tokens": 3}
    status, merged = await post(http, cluster, body)
    assert status == 200, merged
    assert decoded_with_handle(cluster) == 9
    assert all("n" not in r.body for e in cluster.prefill for r in e.requests)  # each leg asks for one sample
    singles = [await alone(http, cluster, one) for one in expected(body, PROMPTS, 3)]
    assert [c["index"] for c in merged["choices"]] == list(range(9))
    assert [c["text"] for c in merged["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert len({c["text"] for c in merged["choices"]}) == 9  # seed + j: the samples differ
    # vLLM counts each prompt once however many samples it has
    prompt_tokens = sum(singles[3 * i]["usage"]["prompt_tokens"] for i in range(3))
    assert merged["usage"]["prompt_tokens"] == prompt_tokens
    assert merged["usage"]["completion_tokens"] == 27


async def test_batch_with_n3_streamed_with_usage(cluster_factory: ClusterFactory,
                                                 http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    body = {"model": "mock", "prompt": PROMPTS, "n": 3, "seed": 7, "max_tokens": 4,
            "stream_options": {"include_usage": True}}
    events = await stream_events(http, cluster, body)
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    chunks = [orjson.loads(e) for e in events[:-1]]
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]  # one summed usage event, last
    texts = [""] * 9
    for chunk in chunks[:-1]:
        assert len(chunk["choices"]) == 1
        assert chunk["id"] == chunks[0]["id"]  # one id for the whole answer
        texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    singles = [await alone(http, cluster, one) for one in expected(body, PROMPTS, 3)]
    assert texts == [s["choices"][0]["text"] for s in singles]
    prompt_tokens = sum(singles[3 * i]["usage"]["prompt_tokens"] for i in range(3))
    assert usage_chunks[0]["usage"].pop("prompt_tokens_details") == {"cached_tokens": 0}  # under one KV block
    assert usage_chunks[0]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 36,
                                        "total_tokens": prompt_tokens + 36}


async def test_batch_streamed_without_usage_has_no_usage_event(cluster_factory: ClusterFactory,
                                                               http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    events = await stream_events(http, cluster, {"model": "mock", "prompt": PROMPTS[:2], "max_tokens": 3})
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks) and len(chunks) == 6
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 0, 0, 1, 1, 1]


async def test_chat_n2_streamed_and_not_in_the_openai_client(cluster_factory: ClusterFactory,
                                                             http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    messages = [{"role": "user", "content": "tell me a story"}]
    result = await client.chat.completions.create(model="mock", messages=messages, n=2, seed=3, max_tokens=4)
    singles = [await alone(http, cluster, {"model": "mock", "messages": messages, "seed": 3 + j, "max_tokens": 4},
                           "/v1/chat/completions") for j in range(2)]
    want = [s["choices"][0]["message"]["content"] for s in singles]
    assert [c.index for c in result.choices] == [0, 1]
    assert [c.message.content for c in result.choices] == want and want[0] != want[1]
    assert result.usage is not None and result.usage.prompt_tokens == singles[0]["usage"]["prompt_tokens"]
    assert result.usage.completion_tokens == 8

    stream = await client.chat.completions.create(model="mock", messages=messages, n=2, seed=3, max_tokens=4,
                                                  stream=True, stream_options={"include_usage": True})
    texts, roles, usage = ["", ""], [0, 0], None
    async for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] += choice.delta.role == "assistant"
    assert texts == want
    assert roles == [1, 1]  # each sample's role delta, under its own index
    assert usage is not None and usage.completion_tokens == 8


async def test_batch_in_the_openai_client(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    result = await client.completions.create(model="mock", prompt=PROMPTS, n=2, max_tokens=3)
    assert [c.index for c in result.choices] == list(range(6))
    singles = [await alone(http, cluster, one) for one in expected({"model": "mock", "max_tokens": 3}, PROMPTS, 1)]
    # no seed: both samples of a prompt get the same body, hence (from this mock) the same text
    assert [c.text for c in result.choices] == [s["choices"][0]["text"] for s in singles for _ in range(2)]

    stream = await client.completions.create(model="mock", prompt=PROMPTS, max_tokens=3, stream=True)
    texts = ["", "", ""]
    async for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [s["choices"][0]["text"] for s in singles]


async def test_lm_eval_style_token_id_batch_with_echo_and_logprobs(cluster_factory: ClusterFactory,
                                                                   http: aiohttp.ClientSession) -> None:
    """lm-eval's loglikelihood requests: token-id prompts in a list, echo, logprobs, temperature 0."""
    cluster = await distinct_cluster(cluster_factory)
    prompts = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    body = {"model": "mock", "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0,
            "seed": 1234}
    status, merged = await post(http, cluster, body)
    assert status == 200, merged
    singles = [await alone(http, cluster, one) for one in expected(body, prompts, 1)]
    for k, (choice, single) in enumerate(zip(merged["choices"], singles, strict=True)):
        assert choice["index"] == k
        assert choice["text"] == single["choices"][0]["text"]
        assert choice["text"].startswith(" ".join(map(str, prompts[k])))  # echoed
        assert choice["logprobs"] == single["choices"][0]["logprobs"] and choice["logprobs"]["tokens"]
    assert merged["usage"]["prompt_tokens"] == 9


async def test_over_max_fanout_is_400_and_nothing_goes_upstream(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory, max_fanout=4)
    for body in ({"prompt": "x", "n": 5}, {"prompt": ["a", "b", "c"], "n": 2}, {"prompt": ["a"] * 5}):
        status, payload = await post(http, cluster, {"model": "mock", "max_tokens": 2, **body})
        assert status == 400
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        assert "at most 4 per request (--max-fanout)" in payload["error"]["message"]
        assert payload["error"]["param"] == ("prompt" if "n" not in body else "n")
    status, payload = await post(http, cluster, {"model": "mock", "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert status == 200 and len(payload["choices"]) == 4  # exactly at the limit
    assert sum(len(e.requests) for e in cluster.prefill) == 4


async def test_a_batch_the_queue_cannot_hold_is_refused_whole(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory, max_concurrency=1, queue_size=2)
    status, payload = await post(http, cluster, {"model": "mock", "prompt": [*PROMPTS, "four"], "max_tokens": 2})
    assert status == 503 and "queue is too full" in payload["error"]["message"]
    assert not any(e.requests for e in cluster.prefill)  # refused before any sub-flow started
    # 1 slot + 2 queue places hold a batch of 3: they run one after the other
    status, payload = await post(http, cluster, {"model": "mock", "prompt": PROMPTS, "max_tokens": 2})
    assert status == 200 and [c["index"] for c in payload["choices"]] == [0, 1, 2]


async def test_a_failing_sub_flow_fails_the_whole_request(cluster_factory: ClusterFactory,
                                                          http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory, n_prefill=1)
    error = b'{"error": {"message": "prompt 2 is too long", "type": "BadRequestError", "param": null, "code": 400}}'
    cluster.prefill[0].fail_next(400, body=error)  # whichever sub-flow reaches P first
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "prompt": PROMPTS, "max_tokens": 2},
                         headers={"X-Request-Id": "batch-1"}) as resp:
        assert resp.status == 400
        assert resp.headers["X-Request-Id"] == "batch-1"
        assert orjson.loads(await resp.read()) == orjson.loads(error)  # the engine's 4xx, unchanged
    await cluster.assert_no_leaks()


async def test_streamed_sub_flow_failing_before_any_byte_is_a_plain_error(cluster_factory: ClusterFactory,
                                                                          http: aiohttp.ClientSession) -> None:
    # D holds every first token for 400 ms; P refuses one prompt at once: nothing reached the client yet
    cluster = await distinct_cluster(cluster_factory, n_prefill=1,
                                     decode=MockConfig(role="decode", distinct_text=True, ttft_ms=400))
    cluster.prefill[0].fail_next(400)
    async with http.post(cluster.url + "/v1/completions",
                         json={"model": "mock", "prompt": PROMPTS, "max_tokens": 2, "stream": True}) as resp:
        assert resp.status == 400
        payload = await resp.json()
    assert set(payload["error"]) >= {"message", "type"}
    await cluster.decode[0].wait_until(lambda s: s.in_flight == 0)  # the other sub-flows were cancelled


async def test_streamed_sub_flow_breaking_mid_stream_ends_with_one_error_then_done(
        cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory)
    decode = cluster.decode[0]
    decode.die_after(1)  # the first decode stream dies after its first token
    decode.hold()  # the others send their first token, then wait
    try:
        events = await stream_events(http, cluster, {"model": "mock", "prompt": PROMPTS, "max_tokens": 4})
        await decode.wait_until(lambda s: s.in_flight == 0)  # the held ones were cancelled, not left running
    finally:
        decode.release()
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    errors = [e for e in events if e.startswith(b'{"error"')]
    assert len(errors) == 1 and b"decode stream broke" in errors[0] and events[-2] == errors[0]
    tokens = [orjson.loads(e) for e in events[:-2]]
    assert all(len(t["choices"]) == 1 for t in tokens) and len(tokens) <= 3
    assert decode.stats.aborted >= 1


async def test_streamed_sub_flow_failing_after_others_started_ends_with_one_error_then_done(
        cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await distinct_cluster(cluster_factory, n_prefill=1, prefill_timeout=0.3, prefill_retries=0)
    cluster.prefill[0].hang_next()  # one flow's prefill times out; the others stream meanwhile
    decode = cluster.decode[0]
    decode.hold()  # the others send their first token, then wait
    try:
        events = await stream_events(http, cluster, {"model": "mock", "prompt": PROMPTS, "max_tokens": 4})
        await decode.wait_until(lambda s: s.in_flight == 0)
    finally:
        decode.release()
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    tokens = [orjson.loads(e) for e in events[:-2]]
    indexes = {t["choices"][0]["index"] for t in tokens}
    assert len(tokens) == 2 and len(indexes) == 2 and indexes < {0, 1, 2}  # the two flows P answered
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 504 and "prefill" in error["message"]
    assert decode.stats.aborted == 2


async def test_client_disconnect_mid_stream_cancels_every_sub_flow(cluster_factory: ClusterFactory) -> None:
    cluster = await distinct_cluster(cluster_factory)
    decode = cluster.decode[0]
    decode.hold()  # each stream sends its first token, then waits
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(cluster.url.rsplit(":", 1)[1]))
        body = orjson.dumps({"model": "mock", "prompt": PROMPTS, "n": 2, "max_tokens": 8, "stream": True})
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 6:  # every sub-flow's first token reached the client
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, received
            received += chunk
        assert decode.stats.in_flight == 6
        writer.close()
        await decode.wait_until(lambda s: s.in_flight == 0)
    finally:
        decode.release()
    assert decode.stats.aborted == 6
    await cluster.assert_no_leaks()
    assert cluster.metric("pdproxy_requests_total", endpoint="/v1/completions", status="499") == 6


@pytest.mark.parametrize("body", [{"prompt": "one prompt"}, {"prompt": ["one prompt"]}, {"prompt": "x", "n": 1}])
async def test_a_plain_request_does_not_fan_out(cluster_factory: ClusterFactory, http: aiohttp.ClientSession,
                                                body: dict[str, Any]) -> None:
    cluster = await distinct_cluster(cluster_factory)
    async with http.post(cluster.url + "/v1/completions", json={"model": "mock", "max_tokens": 2, **body},
                         headers={"X-Request-Id": "plain-1"}) as resp:
        assert resp.status == 200
    assert [r.header("X-Request-Id") for e in cluster.prefill for r in e.requests] == ["plain-1"]  # no "-0"


async def test_fanned_out_requests_are_counted_with_their_flows(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    """pdproxy_fanout_requests_total / _flows_total: each fanned-out request once, with its prompts x n flows; a
    plain request and one refused for its width (400) are not counted; one refused by the queue (503) is, on
    arrival."""
    cluster = await distinct_cluster(cluster_factory, max_fanout=8, max_concurrency=1, queue_size=3)

    def counted() -> tuple[float, float]:
        return cluster.metric("pdproxy_fanout_requests_total"), cluster.metric("pdproxy_fanout_flows_total")

    for body in ({"prompt": PROMPTS}, {"prompt": PROMPTS[:2], "n": 2}, {"prompt": "one"}):
        status, _ = await post(http, cluster, {"model": "mock", "max_tokens": 1, **body})
        assert status == 200
    assert counted() == (2, 3 + 4)
    status, _ = await post(http, cluster, {"model": "mock", "max_tokens": 1, "prompt": "x", "n": 9})
    assert status == 400  # over --max-fanout: refused before fanning out
    assert counted() == (2, 7)
    status, _ = await post(http, cluster, {"model": "mock", "max_tokens": 1, "prompt": ["a", "b", "c", "d", "e"]})
    assert status == 503  # 1 slot + 3 queue places cannot hold 5 flows
    assert counted() == (3, 12)
