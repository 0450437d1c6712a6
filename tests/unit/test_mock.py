"""Tests for the mock vLLM engine: real sockets on port 0, a real aiohttp client."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from pdproxy.mock import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MockConfig,
    MockEngine,
    MockStats,
    RecordedRequest,
    block_ids_for,
    start_mock,
)

Starter = Callable[..., Awaitable[tuple[MockEngine, str]]]

PROMPT = "the quick brown fox jumps over the lazy dog " * 3  # 27 words -> 2 blocks
MESSAGES = [{"role": "user", "content": "hello there mock"}]


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    """Start engines on loopback port 0; every runner is cleaned up even if the test fails."""
    runners: list[web.AppRunner] = []

    async def _start(**kwargs: Any) -> tuple[MockEngine, str]:
        engine, runner, url = await start_mock(MockConfig(**kwargs))
        runners.append(runner)
        return engine, url

    yield _start
    for runner in runners:
        await asyncio.wait_for(runner.cleanup(), 3)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    request_id: str | None = "req-1",
    **kwargs: Any,
) -> tuple[int, Any]:
    headers = {"X-Request-Id": request_id} if request_id else {}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers["Content-Type"] = "application/json"
    async with session.post(url, data=data, headers=headers, **kwargs) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw


async def read_sse(resp: aiohttp.ClientResponse) -> list[bytes]:
    """Return the data payloads of an SSE stream, in order (including b'[DONE]')."""
    events: list[bytes] = []
    async for line in resp.content:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data: "):
            events.append(line[len(b"data: ") :])
        else:
            assert line == b"", line
    return events


async def next_event(resp: aiohttp.ClientResponse) -> bytes:
    """Read one SSE event (a data line and its blank terminator) and return its payload."""
    line = await resp.content.readline()
    assert line.startswith(b"data: "), line
    assert await resp.content.readline() == b"\n"
    return line[len(b"data: ") :].rstrip(b"\n")


def prefill_body(prompt: str = PROMPT) -> dict[str, Any]:
    return {
        "model": "mock",
        "prompt": prompt,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }


# --------------------------------------------------------------------- happy path


async def test_completions_non_stream(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    status, body = await post(session, f"{url}/v1/completions", {"prompt": "a b c", "max_tokens": 3})
    assert status == 200
    assert body["id"] == "cmpl-req-1"
    assert body["object"] == "text_completion"
    assert body["model"] == "mock"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": " tok0 tok1 tok2", "logprobs": None, "finish_reason": "length", "stop_reason": None}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    assert "kv_transfer_params" not in body
    assert engine.stats == MockStats(decodes=1, decodes_without_handle=1, completed=1)


async def test_chat_non_stream_defaults_and_precedence(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start(tokens=4, model="m1")
    status, body = await post(session, f"{url}/v1/chat/completions", {"messages": MESSAGES})
    assert status == 200
    assert body["id"] == "chatcmpl-req-1"
    assert body["object"] == "chat.completion"
    assert body["model"] == "m1"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " tok0 tok1 tok2 tok3"}
    assert choice["finish_reason"] == "length"
    # "user hello there mock" -> 4 prompt words
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 8, "completion_tokens": 4}

    # max_completion_tokens wins over max_tokens; text parts are accepted.
    parts = [{"role": "user", "content": [{"type": "text", "text": "x y"}]}]
    status, body = await post(
        session,
        f"{url}/v1/chat/completions",
        {"messages": parts, "max_tokens": 5, "max_completion_tokens": 2},
    )
    assert status == 200
    assert body["choices"][0]["message"]["content"] == " tok0 tok1"
    assert body["usage"]["prompt_tokens"] == 3
    assert engine.stats.completed == 2


async def test_completions_token_ids_prompt(start: Starter, session: aiohttp.ClientSession) -> None:
    _, url = await start()
    status, body = await post(session, f"{url}/v1/completions", {"prompt": [1, 2, 3, 4], "max_tokens": 1})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 4


async def test_completions_stream_with_usage(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    req = {"prompt": "a b", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{url}/v1/completions", json=req, headers={"X-Request-Id": "s1"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await read_sse(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert [c["choices"][0]["text"] for c in tokens] == [f" tok{i}" for i in range(5)]
    assert all(c["id"] == "cmpl-s1" and c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 4 + ["length"]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "total_tokens": 7, "completion_tokens": 5}
    assert engine.stats.completed == 1
    assert engine.stats.in_flight == 0


async def test_chat_stream_without_usage(start: Starter, session: aiohttp.ClientSession) -> None:
    _, url = await start(tokens=3)
    req = {"messages": MESSAGES, "stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=req) as resp:
        assert resp.status == 200
        events = await read_sse(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"].startswith("chatcmpl-") for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert contents == [" tok0", " tok1", " tok2"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


async def test_stream_many_tokens_without_delay(start: Starter, session: aiohttp.ClientSession) -> None:
    _, url = await start()
    req = {"prompt": "p", "max_tokens": 500, "stream": True}
    async with session.post(f"{url}/v1/completions", json=req) as resp:
        events = await read_sse(resp)
    assert len(events) == 501
    assert orjson.loads(events[-2])["choices"][0]["text"] == " tok499"


async def test_ttft_is_applied(start: Starter, session: aiohttp.ClientSession) -> None:
    _, url = await start(ttft_ms=60, itl_ms=10)
    t0 = time.monotonic()
    status, _ = await post(session, f"{url}/v1/completions", {"prompt": "p", "max_tokens": 3})
    assert status == 200
    assert time.monotonic() - t0 >= 0.075  # ttft + 2 * itl, lower bound only


async def test_requests_are_recorded(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    await post(session, f"{url}/v1/completions", {"prompt": "x"}, request_id="abc")
    async with session.post(
        f"{url}/v1/chat/completions",
        json={"messages": MESSAGES},
        headers={"authorization": "Bearer k", "X-Request-Id": "def"},
    ):
        pass
    await engine.wait_for_requests(2)
    first, second = engine.requests
    assert isinstance(first, RecordedRequest)
    assert first.path == "/v1/completions"
    assert first.body == {"prompt": "x"}
    assert first.header("x-request-id") == "abc"
    assert second.path == "/v1/chat/completions"
    assert second.header("Authorization") == "Bearer k"
    assert second.header("X-Request-Id") == "def"
    assert second.header("missing") is None


async def test_wait_for_requests_times_out() -> None:
    engine = MockEngine()
    with pytest.raises(TimeoutError):
        await engine.wait_for_requests(1, timeout=0.01)


def test_engine_ids_are_fresh_and_config_validated() -> None:
    config = MockConfig()
    a, b = MockEngine(config), MockEngine(config)
    assert len(a.config.engine_id) == 32
    assert a.config.engine_id != b.config.engine_id
    assert config.engine_id == ""  # the caller's config is not mutated
    assert MockEngine(MockConfig(engine_id="fixed")).config.engine_id == "fixed"
    with pytest.raises(ValueError):
        MockConfig(role="router")


# ------------------------------------------------------------------ PD handshake


def test_block_ids_are_deterministic() -> None:
    ids = block_ids_for(PROMPT)
    assert ids == block_ids_for(PROMPT)
    assert len(ids) == 2  # 27 words, 16 per block
    assert len(block_ids_for("one")) == 1
    assert len(block_ids_for(" ".join(["w"] * (BLOCK_SIZE * 3)))) == 3
    assert block_ids_for(PROMPT + "x") != ids


async def test_prefill_returns_handle(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start(role="prefill", engine_id="p-1", side_channel_port=5601)
    status, body = await post(session, f"{url}/v1/completions", prefill_body(), request_id="r-42")
    assert status == 200
    assert body["choices"][0]["text"] == " tok0"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1
    assert body["kv_transfer_params"] == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": block_ids_for(PROMPT),
        "remote_engine_id": "p-1",
        "remote_request_id": "r-42",
        "remote_host": "127.0.0.1",
        "remote_port": 5601,
        "tp_size": 1,
    }
    assert engine.stats == MockStats(prefills=1, completed=1)


async def test_prefill_without_request_id_generates_one(start: Starter, session: aiohttp.ClientSession) -> None:
    _, url = await start(role="prefill")
    status, body = await post(session, f"{url}/v1/completions", prefill_body(), request_id=None)
    assert status == 200
    rid = body["kv_transfer_params"]["remote_request_id"]
    assert rid
    assert body["id"] == f"cmpl-{rid}"


async def test_decode_handle_validation(start: Starter, session: aiohttp.ClientSession) -> None:
    _, p_url = await start(role="prefill")
    d_engine, d_url = await start(role="decode")
    _, prefill = await post(session, f"{p_url}/v1/completions", prefill_body(), request_id="r1")
    handle = prefill["kv_transfer_params"]

    def decode(kv: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 2}
        if kv is not None:
            body["kv_transfer_params"] = kv
        return body

    status, _ = await post(session, f"{d_url}/v1/completions", decode(handle), request_id="r1")
    assert status == 200
    assert d_engine.stats.decodes_with_valid_handle == 1

    tampered = [
        {**handle, "remote_block_ids": [*handle["remote_block_ids"], 7]},
        {**handle, "remote_request_id": "someone-else"},
        {k: v for k, v in handle.items() if k != "remote_host"},
    ]
    for kv in tampered:
        status, _ = await post(session, f"{d_url}/v1/completions", decode(kv), request_id="r1")
        assert status == 200  # like vLLM: an unusable handle means recompute, not an error
    # Right handle, wrong prompt.
    status, _ = await post(session, f"{d_url}/v1/completions", {**decode(handle), "prompt": "other"}, request_id="r1")
    assert status == 200
    # Right handle, but the decode request carries another X-Request-Id.
    await post(session, f"{d_url}/v1/completions", decode(handle), request_id="r2")
    await post(session, f"{d_url}/v1/completions", decode(None), request_id="r1")

    assert d_engine.stats == MockStats(
        decodes=7,
        decodes_with_valid_handle=1,
        decodes_with_invalid_handle=5,
        decodes_without_handle=1,
        completed=7,
    )


async def test_chat_prefill_then_decode(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()  # role "both" serves either half
    body = {"messages": MESSAGES, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    status, prefill = await post(session, f"{url}/v1/chat/completions", body, request_id="c1")
    assert status == 200
    handle = prefill["kv_transfer_params"]
    assert prefill["id"] == "chatcmpl-c1"
    decode = {"messages": MESSAGES, "stream": True, "kv_transfer_params": handle}
    async with session.post(f"{url}/v1/chat/completions", json=decode, headers={"X-Request-Id": "c1"}) as r:
        events = await read_sse(r)
    assert events[-1] == b"[DONE]"
    assert engine.stats.prefills == 1
    assert engine.stats.decodes_with_valid_handle == 1


async def test_role_checks(start: Starter, session: aiohttp.ClientSession) -> None:
    p_engine, p_url = await start(role="prefill")
    d_engine, d_url = await start(role="decode")
    decode_handle = {"do_remote_prefill": True, "remote_block_ids": [1]}

    status, body = await post(session, f"{p_url}/v1/completions", {"prompt": "x", "kv_transfer_params": decode_handle})
    assert status == 400
    assert body["error"]["code"] == 400
    assert "prefill engine" in body["error"]["message"]

    status, body = await post(session, f"{d_url}/v1/completions", prefill_body())
    assert status == 400
    assert "decode engine" in body["error"]["message"]

    # Plain requests are fine on either.
    assert (await post(session, f"{p_url}/v1/completions", {"prompt": "x"}))[0] == 200
    assert (await post(session, f"{d_url}/v1/completions", {"prompt": "x"}))[0] == 200
    assert p_engine.stats.prefills == 0 and p_engine.stats.decodes == 1
    assert d_engine.stats.prefills == 0 and d_engine.stats.decodes == 1


# -------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/completions", b"{not json", "JSON object"),
        ("/v1/completions", b"[1, 2]", "JSON object"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
        ("/v1/chat/completions", {"prompt": "x"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "text content",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "stream": False, "stream_options": {"include_usage": True}},
            "Stream options can only be defined when `stream=True`.",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "stream_options": {"include_usage": True}},
            "Stream options can only be defined when `stream=True`.",
        ),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n=1"),
        ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "maximum context length"),
        ("/v1/completions", {"prompt": "x", "kv_transfer_params": "nope"}, "kv_transfer_params"),
        (
            "/v1/completions",
            {"prompt": "x", "stream": True, "kv_transfer_params": {"do_remote_decode": True}},
            "must not stream",
        ),
    ],
)
async def test_validation_errors(
    start: Starter, session: aiohttp.ClientSession, path: str, body: Any, needle: str
) -> None:
    engine, url = await start()
    status, answer = await post(session, url + path, body)
    assert status == 400
    err = answer["error"]
    assert needle in err["message"]
    assert err["type"] == "BadRequestError"
    assert err["code"] == 400
    assert "param" in err
    assert engine.stats == MockStats()  # neither a prefill nor a decode
    assert len(engine.requests) == 1  # but recorded


# ------------------------------------------------------------------- misc routes


async def test_health_models_stats(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start(role="decode", model="m-x", engine_id="e-9")
    async with session.get(f"{url}/health") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with session.get(f"{url}/v1/models") as resp:
        models = orjson.loads(await resp.read())
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == card["root"] == "m-x"
    assert card["object"] == "model"
    assert card["owned_by"] == "pdproxy-mock"
    assert card["max_model_len"] == MAX_MODEL_LEN
    await post(session, f"{url}/v1/completions", {"prompt": "x"})
    async with session.get(f"{url}/stats") as resp:
        stats = orjson.loads(await resp.read())
    assert stats["role"] == "decode"
    assert stats["engine_id"] == "e-9"
    assert stats["decodes"] == 1 and stats["completed"] == 1 and stats["in_flight"] == 0
    assert {k: v for k, v in stats.items() if k not in ("role", "engine_id")} == dataclasses.asdict(engine.stats)


# ----------------------------------------------------------------- scripted faults


async def test_fail_next_fifo_and_times(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.fail_next(503, times=2)
    engine.fail_next(429, body=b'{"custom": true}')
    answers = [await post(session, f"{url}/v1/completions", {"prompt": "x"}) for _ in range(4)]
    assert [a[0] for a in answers] == [503, 503, 429, 200]
    assert answers[0][1]["error"]["code"] == 503
    assert answers[2][1] == {"custom": True}
    assert len(engine.requests) == 4
    assert engine.stats.completed == 1 and engine.stats.decodes == 1


async def test_garbage_next(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.garbage_next()
    async with session.post(f"{url}/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == b"this is not json{"
    assert (await post(session, f"{url}/v1/completions", {"prompt": "x"}))[0] == 200


async def test_drop_next(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.drop_next()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, f"{url}/v1/completions", {"prompt": "x"})
    assert len(engine.requests) == 1
    assert (await post(session, f"{url}/v1/completions", {"prompt": "x"}))[0] == 200


async def test_hang_next_client_timeout(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.hang_next()
    with pytest.raises(asyncio.TimeoutError):
        await post(session, f"{url}/v1/completions", {"prompt": "x"}, timeout=aiohttp.ClientTimeout(total=0.1))
    assert len(engine.requests) == 1
    assert (await post(session, f"{url}/v1/completions", {"prompt": "x"}))[0] == 200


async def test_hang_does_not_block_shutdown(session: aiohttp.ClientSession) -> None:
    engine, runner, url = await start_mock()
    try:
        engine.hang_next()
        engine.stall_after(1)
        hung = asyncio.create_task(post(session, f"{url}/v1/completions", {"prompt": "x"}))
        stalled = asyncio.create_task(
            post(session, f"{url}/v1/completions", {"prompt": "x", "stream": True}, request_id="b")
        )
        await engine.wait_for_requests(2)
        await engine.wait_until(lambda s: s.in_flight == 1)
    finally:
        await asyncio.wait_for(runner.cleanup(), 2)  # well below aiohttp's shutdown timeout
    with pytest.raises(aiohttp.ClientError):
        await hung
    with pytest.raises(aiohttp.ClientError):
        await stalled
    assert engine.stats.in_flight == 0


async def test_wait_for_requests_sees_a_hanging_request(start: Starter) -> None:
    engine, url = await start()
    engine.hang_next()
    async with aiohttp.ClientSession() as client:
        pending = asyncio.create_task(client.post(f"{url}/v1/completions", json={"prompt": "x"}))
        await engine.wait_for_requests(1, timeout=2)
        assert engine.requests[0].body == {"prompt": "x"}
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending


async def test_die_after(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.die_after(3)
    events: list[bytes] = []
    req = {"prompt": "x", "max_tokens": 10, "stream": True}
    async with session.post(f"{url}/v1/completions", json=req) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line.strip()[6:])
    assert len(events) == 3
    assert b"[DONE]" not in events
    assert [orjson.loads(e)["choices"][0]["finish_reason"] for e in events] == [None] * 3
    await engine.wait_idle()
    assert engine.stats.completed == 0 and engine.stats.aborted == 0
    # The next request is normal again.
    async with session.post(f"{url}/v1/completions", json=req) as resp:
        assert (await read_sse(resp))[-1] == b"[DONE]"


async def test_die_after_non_stream_drops(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.die_after(2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, f"{url}/v1/completions", {"prompt": "x"})


async def test_stall_after_then_disconnect(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start()
    engine.stall_after(2)
    req = {"messages": MESSAGES, "max_tokens": 10, "stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=req) as resp:
        events = [await next_event(resp) for _ in range(3)]  # role chunk + 2 token chunks
        assert b"tok1" in events[-1]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 0.1)  # nothing more will come
        assert engine.stats.in_flight == 1
        resp.close()  # client goes away
    await engine.wait_until(lambda s: s.aborted == 1 and s.in_flight == 0, timeout=2)


async def test_client_disconnect_mid_stream(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start(itl_ms=5)
    req = {"prompt": "x", "max_tokens": 1000, "stream": True}
    async with session.post(f"{url}/v1/completions", json=req) as resp:
        for _ in range(2):
            await next_event(resp)
        resp.close()
    await engine.wait_until(lambda s: s.aborted == 1, timeout=2)
    await engine.wait_idle(timeout=2)
    assert engine.stats.completed == 0
    assert engine.stats.in_flight == 0


async def test_client_disconnect_during_ttft(start: Starter, session: aiohttp.ClientSession) -> None:
    engine, url = await start(ttft_ms=10_000)
    task = asyncio.create_task(post(session, f"{url}/v1/completions", {"prompt": "x"}))
    await engine.wait_until(lambda s: s.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.wait_until(lambda s: s.aborted == 1 and s.in_flight == 0, timeout=2)


async def test_stop_answering_holds_requests_until_resumed(start: Starter, session: aiohttp.ClientSession) -> None:
    """The hung-P switch: /health still answers, generations wait, and go on normally once resumed."""
    engine, url = await start()
    async with session.post(f"{url}/mock/hang") as resp:
        assert resp.status == 200 and (await resp.json()) == {"answering": False}
    assert not engine.answering
    held = asyncio.create_task(post(session, f"{url}/v1/completions", {"prompt": "x"}))
    await engine.wait_for_requests(1)
    async with session.get(f"{url}/health") as resp:
        assert resp.status == 200
    assert not held.done()
    async with session.delete(f"{url}/mock/hang") as resp:
        assert (await resp.json()) == {"answering": True}
    status, _body = await asyncio.wait_for(held, 2)
    assert status == 200


async def test_a_request_held_by_stop_answering_ends_with_its_client(start: Starter) -> None:
    engine, url = await start()
    engine.stop_answering()
    async with aiohttp.ClientSession() as client:
        with pytest.raises(asyncio.TimeoutError):
            await client.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=aiohttp.ClientTimeout(total=0.1))
    await engine.wait_until(lambda _stats: engine.handlers_running == 0)  # its handler was cancelled, not left waiting
    engine.resume_answering()
