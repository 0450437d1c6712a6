"""The official `openai` client through the proxy to mock P/D engines, on both endpoints."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Cluster

EXPECTED_16 = "".join(f" tok{i}" for i in range(16))


def client(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)


async def test_completions_non_stream(cluster: Cluster) -> None:
    result = await client(cluster).completions.create(model="mock", prompt="hello world", max_tokens=16)
    assert result.choices[0].text == EXPECTED_16
    assert result.usage is not None and result.usage.completion_tokens == 16
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1
    assert sum(e.stats.prefills for e in cluster.prefill) == 1


async def test_completions_stream(cluster: Cluster) -> None:
    stream = await client(cluster).completions.create(model="mock", prompt="hello world", max_tokens=16,
                                                      stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == EXPECTED_16
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


async def test_chat_non_stream(cluster: Cluster) -> None:
    result = await client(cluster).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hello"}], max_completion_tokens=16
    )
    assert result.choices[0].message.content == EXPECTED_16
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


async def test_chat_stream_with_usage(cluster: Cluster) -> None:
    stream = await client(cluster).chat.completions.create(
        model="mock", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=16, stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED_16
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1


async def test_models_come_from_a_decode_server(cluster: Cluster) -> None:
    models = await client(cluster).models.list()
    assert [m.id for m in models.data] == ["mock"]


async def test_upstream_4xx_reaches_the_openai_client_as_its_error(cluster: Cluster) -> None:
    for engine in cluster.prefill:
        engine.fail_next(400, body=b'{"error": {"message": "prompt is too long", "type": "BadRequestError", '
                                   b'"param": null, "code": 400}}')
    with pytest.raises(openai.BadRequestError, match="prompt is too long"):
        await client(cluster).completions.create(model="mock", prompt="hello", max_tokens=4)


async def test_broken_stream_surfaces_as_an_error_in_the_openai_client(cluster: Cluster) -> None:
    cluster.decode[0].die_after(3)
    stream = await client(cluster).completions.create(model="mock", prompt="hello", max_tokens=16, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="decode stream broke"):
        async for chunk in stream:
            received.append(chunk.choices[0].text)
    assert received == [" tok0", " tok1", " tok2"]
