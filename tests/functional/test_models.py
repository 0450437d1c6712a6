"""Several models in one proxy: each request reaches the P and D pools of its `model`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from pdproxy.mock import MockConfig, MockEngine, start_mock
from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory, sse_events
from tests.functional.test_admin import cli
from tests.functional.test_resilience import FAST_HEALTH

Engines = dict[str, tuple[MockEngine, str]]


class MockEngines:
    """Mock engines serving a given model on port 0: `await engines("alpha", "prefill")` -> (engine, url)."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}

    async def __call__(self, model: str, role: str, **config: Any) -> tuple[MockEngine, str]:
        engine, runner, url = await start_mock(MockConfig(role=role, model=model, **config))
        self.runners[url] = runner
        return engine, url

    async def stop(self, url: str) -> None:
        """The engine at `url` goes away: its connections drop, its port refuses."""
        await self.runners.pop(url).cleanup()


@pytest.fixture
async def engines() -> AsyncIterator[MockEngines]:
    started = MockEngines()
    yield started
    for runner in started.runners.values():
        await runner.cleanup()


async def two_models(cluster_factory: ClusterFactory, engines: MockEngines, *, configured: bool = True,
                     **settings: Any) -> tuple[Cluster, Engines]:
    """alpha and beta, one P and one D each; their models given as `@model` or left to discovery."""
    started: Engines = {}
    for model in ("alpha", "beta"):
        for role in ("prefill", "decode"):
            started[f"{model}-{role}"] = await engines(model, role)

    def server(key: str) -> str:
        model = key.split("-")[0]
        return started[key][1] + (f"@{model}" if configured else "")

    cluster = await cluster_factory(0, 0, extra_prefill=(server("alpha-prefill"), server("beta-prefill")),
                                    extra_decode=(server("alpha-decode"), server("beta-decode")), **settings)
    return cluster, started


def body(model: str | None, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {**({"model": model} if model is not None else {}), "prompt": "hello there", "max_tokens": 4,
            "stream": stream, **extra}


async def complete(http: aiohttp.ClientSession, cluster: Cluster, payload: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(cluster.url + "/v1/completions", json=payload) as resp:
        raw = await resp.read()
        if payload.get("stream") and resp.status == 200:
            return resp.status, sse_events(raw)
        return resp.status, await resp.json(content_type=None)


def served(started: Engines) -> dict[str, int]:
    return {key: len(engine.requests) for key, (engine, _) in started.items()}


async def test_each_model_reaches_its_own_prefill_and_decode(cluster_factory: ClusterFactory, engines: MockEngines,
                                                             http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, health_interval=0)
    for stream in (False, True):
        for model, other in (("alpha", "beta"), ("beta", "alpha")):
            before = served(started)
            status, answer = await complete(http, cluster, body(model, stream))
            assert status == 200, answer
            after = served(started)
            assert after[f"{model}-prefill"] == before[f"{model}-prefill"] + 1
            assert after[f"{model}-decode"] == before[f"{model}-decode"] + 1
            assert after[f"{other}-prefill"] == before[f"{other}-prefill"]
            assert after[f"{other}-decode"] == before[f"{other}-decode"]
            if stream:
                assert answer[-1] == b"[DONE]" and f'"model":"{model}"'.encode() in answer[0]
            else:
                assert answer["model"] == model  # the mock answers with the model it serves
    status, health = await _get(http, cluster, "/health?verbose=1")
    assert status == 200
    assert health["models"] == {m: {"prefill": {"routable": 1, "total": 1}, "decode": {"routable": 1, "total": 1}}
                                for m in ("alpha", "beta")}
    assert sorted((u["role"], u["models"][0]) for u in health["upstreams"]) == [
        ("decode", "alpha"), ("decode", "beta"), ("prefill", "alpha"), ("prefill", "beta")]
    await cluster.assert_no_leaks()


async def test_unknown_model_is_vllms_404_in_the_openai_client(cluster_factory: ClusterFactory, engines: MockEngines,
                                                               http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, health_interval=0)
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    async with client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.completions.create(model="gamma", prompt="hi", max_tokens=2)
        assert caught.value.status_code == 404
        assert caught.value.body == {"message": "The model `gamma` does not exist.", "type": "NotFoundError",
                                     "param": None, "code": 404}
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True)
        answer = await client.completions.create(model="beta", prompt="hi", max_tokens=2)
        assert answer.model == "beta"
    assert sum(served(started).values()) == 2  # the refused requests reached no engine
    await cluster.assert_no_leaks()


async def test_missing_or_malformed_model_with_several_models_is_a_400(cluster_factory: ClusterFactory,
                                                                       engines: MockEngines,
                                                                       http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, health_interval=0)
    status, answer = await complete(http, cluster, body(None))
    assert status == 400
    assert answer["error"]["param"] == "model" and "alpha, beta" in answer["error"]["message"]
    status, answer = await complete(http, cluster, body(None) | {"model": 7})
    assert (status, answer["error"]["message"]) == (400, "'model' must be a string")
    assert sum(served(started).values()) == 0
    await cluster.assert_no_leaks()


async def test_one_model_needs_no_model_and_the_engine_judges_the_name(cluster_factory: ClusterFactory,
                                                                      http: aiohttp.ClientSession) -> None:
    """Today's deployments: no `@model`, one model; nothing changes (no lookup, no proxy-side 404)."""
    cluster = await cluster_factory(1, 1, **FAST_HEALTH)
    await cluster.wait_for(lambda: all(u.state is State.HEALTHY for u in cluster.upstreams()))
    assert [u.models for u in cluster.upstreams()] == [("mock",), ("mock",)]  # discovered all the same
    assert cluster.flow.models.single is cluster.flow.models.everything
    for payload in (body(None), body("mock"), body("another-name")):
        status, answer = await complete(http, cluster, payload)
        assert status == 200, answer  # the mock serves any name: the engine, not the proxy, judges it
    status, health = await _get(http, cluster, "/health")
    assert status == 200 and "models" not in health
    await cluster.assert_no_leaks()


async def test_v1_models_lists_the_union_once_per_id(cluster_factory: ClusterFactory, engines: MockEngines,
                                                     http: aiohttp.ClientSession) -> None:
    cluster, _ = await two_models(cluster_factory, engines, health_interval=0)
    # A third server configured as `gamma` whose engine lists `beta`: the answers overlap, the union does not.
    _, url = await engines("beta", "decode")
    status, _ = await _admin(http, cluster, "POST", {"role": "decode", "url": url, "model": "gamma"})
    assert status == 201
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    async with client:
        listed = [model.id for model in (await client.models.list()).data]
    assert sorted(listed) == ["alpha", "beta"]
    await cluster.assert_no_leaks()


async def test_admin_adds_a_third_model_and_traffic_reaches_it(cluster_factory: ClusterFactory, engines: MockEngines,
                                                               http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, health_interval=0)
    status, answer = await complete(http, cluster, body("gamma"))
    assert status == 404
    for role in ("prefill", "decode"):
        started[f"gamma-{role}"] = await engines("gamma", role)
    status, added = await _admin(http, cluster, "POST", [
        {"role": role, "url": started[f"gamma-{role}"][1], "model": "gamma"} for role in ("prefill", "decode")])
    assert status == 201 and [u["models"] for u in added["upstreams"]] == [["gamma"], ["gamma"]]
    for stream in (False, True):
        status, answer = await complete(http, cluster, body("gamma", stream))
        assert status == 200, answer
    assert served(started)["gamma-prefill"] == 2 and served(started)["gamma-decode"] == 2
    assert served(started)["alpha-decode"] == served(started)["beta-decode"] == 0
    status, listing = await _admin(http, cluster, "GET")
    assert sorted(u["models"][0] for u in listing["upstreams"]) == ["alpha", "alpha", "beta", "beta", "gamma",
                                                                     "gamma"]
    async with http.get(cluster.url + "/v1/models") as resp:
        assert sorted(m["id"] for m in (await resp.json())["data"]) == ["alpha", "beta", "gamma"]
    status, bad = await _admin(http, cluster, "POST", {"role": "decode", "url": started["gamma-decode"][1],
                                                       "model": "has space"})
    assert status == 400 and "model" in bad["error"]["message"]
    await cluster.assert_no_leaks()


async def test_models_are_discovered_from_each_upstreams_v1_models(
        cluster_factory: ClusterFactory, engines: MockEngines, http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, configured=False, **FAST_HEALTH)
    await cluster.wait_for(lambda: all(u.state is State.HEALTHY for u in cluster.upstreams()))
    # The probe reads the names before it reports the upstream healthy: known by now.
    assert sorted(u.models for u in cluster.upstreams()) == [("alpha",), ("alpha",), ("beta",), ("beta",)]
    assert cluster.flow.models.names == ["alpha", "beta"]
    for model in ("alpha", "beta"):
        status, answer = await complete(http, cluster, body(model))
        assert status == 200 and answer["model"] == model
    assert served(started) == {"alpha-prefill": 1, "alpha-decode": 1, "beta-prefill": 1, "beta-decode": 1}
    status, health = await _get(http, cluster, "/health?verbose=1")
    assert {u["url"]: u["models"] for u in health["upstreams"]} == {
        url: [key.split("-")[0]] for key, (_, url) in started.items()}
    await cluster.assert_no_leaks()


async def test_an_upstream_added_without_a_model_gets_traffic_only_once_its_model_is_known(
        cluster_factory: ClusterFactory, engines: MockEngines, http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, **FAST_HEALTH)
    await cluster.wait_for(lambda: all(u.state is State.HEALTHY for u in cluster.upstreams()))
    for role in ("prefill", "decode"):
        started[f"gamma-{role}"] = await engines("gamma", role)
    status, _ = await _admin(http, cluster, "POST", [{"role": role, "url": started[f"gamma-{role}"][1]}
                                                     for role in ("prefill", "decode")])
    assert status == 201
    added = [cluster.upstream(started[f"gamma-{role}"][1]) for role in ("prefill", "decode")]
    assert all(u.state is State.WARMING and u.models == () for u in added)
    await cluster.wait_for(lambda: all(u.state is State.HEALTHY for u in added))
    assert [u.models for u in added] == [("gamma",), ("gamma",)]
    status, answer = await complete(http, cluster, body("gamma"))
    assert status == 200 and answer["model"] == "gamma"
    await cluster.assert_no_leaks()


async def test_a_model_without_healthy_servers_gets_503_while_the_other_serves(
        cluster_factory: ClusterFactory, engines: MockEngines, http: aiohttp.ClientSession) -> None:
    # Panic off: a one-member pool whose member is down would otherwise route to it (panic is per model too).
    cluster, started = await two_models(cluster_factory, engines, healthy_panic_threshold=0, **FAST_HEALTH)
    await cluster.wait_for(lambda: all(u.state is State.HEALTHY for u in cluster.upstreams()))
    beta_prefill = cluster.upstream(started["beta-prefill"][1])
    await engines.stop(beta_prefill.url)
    await cluster.wait_state(beta_prefill.url, State.UNHEALTHY)
    status, answer = await complete(http, cluster, body("beta"))
    assert status == 503
    assert answer["error"]["message"] == "no routable prefill upstream for model `beta`"
    status, answer = await complete(http, cluster, body("alpha", stream=True))
    assert status == 200 and answer[-1] == b"[DONE]"
    # Emptied by the operator: the same 503, on the decode side.
    beta_decode = cluster.upstream(started["beta-decode"][1])
    status, _ = await _admin(http, cluster, "DELETE", path=f"/{beta_decode.id}?force=1")
    assert status == 200
    status, answer = await complete(http, cluster, body("beta"))
    assert status == 503 and "decode upstream for model `beta`" in answer["error"]["message"]
    status, answer = await complete(http, cluster, body("alpha"))
    assert status == 200
    status, health = await _get(http, cluster, "/health")
    assert status == 200 and health["models"]["beta"] == {"prefill": {"routable": 0, "total": 1},
                                                          "decode": {"routable": 0, "total": 0}}
    await cluster.assert_no_leaks()


async def _get(http: aiohttp.ClientSession, cluster: Cluster, path: str) -> tuple[int, Any]:
    async with http.get(cluster.url + path) as resp:
        return resp.status, await resp.json()


async def _admin(http: aiohttp.ClientSession, cluster: Cluster, method: str, payload: Any = None,
                 path: str = "") -> tuple[int, Any]:
    async with http.request(method, cluster.url + "/admin/upstreams" + path, json=payload) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_cli_adds_an_upstream_with_its_model_and_lists_models(cluster_factory: ClusterFactory,
                                                                    engines: MockEngines) -> None:
    cluster, _ = await two_models(cluster_factory, engines, health_interval=0)
    _, url = await engines("gamma", "decode")
    code, out = await cli(cluster, "add", "decode", url, "--model", "gamma")
    assert code == 0 and out.startswith(f"added decode {url}"), out
    assert cluster.upstream(url).models == ("gamma",)
    code, out = await cli(cluster, "list")
    header, *rows = out.strip().splitlines()
    column = header.index("MODELS")
    assert code == 0 and sorted(row[column:].split()[0] for row in rows) == ["alpha", "alpha", "beta", "beta",
                                                                             "gamma"]


async def test_a_model_at_its_cap_holds_back_only_its_own_queued_requests(
        cluster_factory: ClusterFactory, engines: MockEngines, http: aiohttp.ClientSession) -> None:
    cluster, started = await two_models(cluster_factory, engines, health_interval=0, decode_max_in_flight=1)
    alpha_decode = started["alpha-decode"][0]
    alpha_decode.config.itl_ms = 20  # 40 tokens: the first alpha stream holds alpha's only decode slot a while
    held = asyncio.ensure_future(complete(http, cluster, body("alpha", stream=True, max_tokens=40)))
    await alpha_decode.wait_for_requests(1)
    queued = asyncio.ensure_future(complete(http, cluster, body("alpha")))
    for _ in range(400):  # the queue wakes no one when it grows: look every 5 ms, for 2 s at most
        if cluster.flow.admission.waiting == 1:
            break
        await asyncio.sleep(0.005)
    assert cluster.flow.admission.waiting == 1, "the second alpha request never queued"
    status, answer = await asyncio.wait_for(complete(http, cluster, body("beta")), 2)
    assert status == 200 and answer["model"] == "beta"  # not queued behind alpha's line
    assert not held.done() and not queued.done()
    (held_status, events), (queued_status, _) = await asyncio.wait_for(asyncio.gather(held, queued), 5)
    assert (held_status, events[-1], queued_status) == (200, b"[DONE]", 200)
    await cluster.assert_no_leaks()


async def test_pass_through_routes_go_to_their_models_servers(cluster_factory: ClusterFactory,
                                                               engines: MockEngines,
                                                               http: aiohttp.ClientSession) -> None:
    cluster, _ = await two_models(cluster_factory, engines, health_interval=0)
    for model in ("alpha", "beta") * 4:  # one pool of both models would answer the other model now and then
        async with http.post(cluster.url + "/v1/embeddings", json={"model": model, "input": "hi there"}) as resp:
            assert resp.status == 200 and (await resp.json())["model"] == model
    async with http.post(cluster.url + "/v1/embeddings", json={"model": "gamma", "input": "hi"}) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["type"] == "NotFoundError"
    async with http.post(cluster.url + "/v1/embeddings", json={"input": "hi"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "model"
    await cluster.assert_no_leaks()
