"""Client API keys: none, wrong and right keys over raw HTTP and the `openai` client; per-key caps; keys stay
out of logs and off the upstream legs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import openai
import pytest

from pdproxy.http.auth import ClientKeys, read_key_file
from pdproxy.settings import Settings
from tests.conftest import ClusterFactory

KEY, OTHER = "sk-right-0123456789", "sk-second-key"
COMPLETION = {"model": "mock", "prompt": "hi there", "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_no_key_and_a_wrong_key_get_401_in_the_openai_shape(cluster_factory: ClusterFactory,
                                                                    http: aiohttp.ClientSession,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    cluster = await cluster_factory(api_key=(KEY, OTHER), access_log=True)
    caplog.set_level(logging.INFO)
    for headers in ({}, bearer("sk-wrong"), {"Authorization": KEY}, bearer(KEY[:-1]), bearer("")):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models"),
                             ("GET", "/v1/responses/resp_x")):
            async with http.request(method, cluster.url + path, json=COMPLETION, headers=headers) as resp:
                assert resp.status == 401, (path, headers)
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                error = (await resp.json())["error"]
            assert error["type"] == "authentication_error" and error["code"] == 401
            assert set(error) == {"message", "type", "param", "code"}
    assert not any(e.requests for e in [*cluster.prefill, *cluster.decode])
    assert cluster.metric("pdproxy_requests_total", endpoint="/v1/completions", status="401") == 5
    assert KEY not in caplog.text and KEY[:-1] not in caplog.text and "sk-wrong" not in caplog.text


async def test_either_right_key_is_served_and_never_forwarded(cluster_factory: ClusterFactory,
                                                              http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(api_key=(KEY, OTHER))
    for key in (KEY, OTHER):
        async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(key)) as resp:
            assert resp.status == 200
        async with http.post(cluster.url + "/tokenize", json={"prompt": "a"}, headers=bearer(key)) as resp:
            assert resp.status == 200
    for engine in [*cluster.prefill, *cluster.decode]:
        for request in engine.requests:
            assert request.header("Authorization") is None  # the client's key is the proxy's, not the engine's


async def test_upstreams_get_the_upstream_key_instead(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(api_key=(KEY,), upstream_api_key="sk-engine")
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(KEY)) as resp:
        assert resp.status == 200
    seen = {r.header("Authorization") for e in [*cluster.prefill, *cluster.decode] for r in e.requests}
    assert seen == {"Bearer sk-engine"}


async def test_probes_and_scrapes_need_no_key(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(api_key=(KEY,))
    for path in ("/health", "/livez", "/metrics"):
        async with http.get(cluster.url + path) as resp:
            assert resp.status == 200, path


async def test_the_openai_client_with_no_wrong_and_right_key(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(api_key=(KEY,))

    clients: list[openai.AsyncOpenAI] = []

    def client(key: str) -> openai.AsyncOpenAI:
        clients.append(openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key=key, max_retries=0, timeout=5))
        return clients[-1]

    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        await client("sk-wrong").completions.create(model="mock", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError, match="missing API key"):  # the header left out
        await client("unused").chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}],
                                                       extra_headers={"Authorization": openai.Omit()})
    right = client(KEY)
    answer = await right.completions.create(model="mock", prompt="hi", max_tokens=2)
    assert answer.choices[0].text == " tok0 tok1"
    embedding = await right.embeddings.create(model="mock", input="hi")
    assert len(embedding.data[0].embedding) == 8
    stream = await right.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == " tok0 tok1 tok2"
    for made in clients:
        await made.close()


async def test_a_key_over_its_cap_gets_429_and_its_slot_back(cluster_factory: ClusterFactory,
                                                             http: aiohttp.ClientSession, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\n{KEY} 1\n\n{OTHER}   # default cap\n")
    cluster = await cluster_factory(api_key_file=keys, api_key_max_in_flight=0)
    cluster.decode[0].hold()  # streams pause after their first token
    body = {**COMPLETION, "stream": True, "max_tokens": 3}
    async with http.post(cluster.url + "/v1/completions", json=body, headers=bearer(KEY)) as first:
        assert first.status == 200
        await first.content.readuntil(b"\n\n")  # in flight, holding KEY's one slot
        async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(KEY)) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
        async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(OTHER)) as resp:
            assert resp.status == 200  # another key is not held back
        cluster.decode[0].release()
        await first.read()
    await cluster.assert_no_leaks()
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(KEY)) as resp:
        assert resp.status == 200  # the slot came back when the stream ended


async def test_a_cancelled_request_gives_its_slot_back(cluster_factory: ClusterFactory,
                                                       http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(api_key=(KEY,), api_key_max_in_flight=1)
    cluster.decode[0].hang_next()
    task = asyncio.ensure_future(http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(KEY)))
    await cluster.decode[0].wait_for_requests(1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await cluster.assert_no_leaks()
    async with http.post(cluster.url + "/v1/completions", json=COMPLETION, headers=bearer(KEY)) as resp:
        assert resp.status == 200


def test_keys_parse_from_env_and_files_and_bad_files_are_refused(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDPROXY_API_KEY", f"{KEY}, {OTHER}")
    settings = Settings(prefill_servers="http://127.0.0.1:1", decode_servers="http://127.0.0.1:2")
    assert settings.client_keys() == [(KEY, -1), (OTHER, -1)]
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    bad = tmp_path / "bad"
    bad.write_text(f"{KEY} many\n")
    with pytest.raises(ValueError, match="bad:1") as info:
        read_key_file(bad)
    assert KEY not in str(info.value)
    missing = Settings(prefill_servers="http://127.0.0.1:1", decode_servers="http://127.0.0.1:2",
                       api_key_file=tmp_path / "none")
    with pytest.raises(ValueError, match="cannot read api_key_file"):
        missing.client_keys()
    with pytest.raises(ValueError, match="empty"):
        ClientKeys([("", -1)])


def test_the_cli_flag_repeats() -> None:
    from pdproxy.cli import build_parser

    args = build_parser().parse_args(["serve", "--api-key", KEY, "--api-key", OTHER])
    assert args.api_key == [KEY, OTHER]
