"""pdproxy in front of real vLLM engines: 2 prefill + 1 decode, NixlConnector, started by scripts/e2e-vllm.sh.

What these tests prove, with vLLM's own counters as the witness:
- the KV really travels: on D, `vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}` grows by
  each request's prompt tokens and `source="local_compute"` never grows;
- the answer is right: greedy output through pdproxy equals what a prefill server alone produces;
- completions and chat, streamed and not, `usage`, `X-Request-Id`, `/v1/models`, 32 concurrent requests
  over both prefill servers, prefix affinity with `prefix_hash` (vLLM's prefix-cache hits rise on one P),
  and prefill failover when a prefill server dies with requests in flight;
- the Responses API passed through: answers equal to the engine's own, streams well formed, and GET and
  cancel by id reaching the server that made the answer (of two: the prefill pool, on the proxy started
  with `--route-pools /v1/responses=prefill`; the stage has one decode server).

The tests run in file order on one shared cluster: the failover tests kill and restart a prefill
server, so they come last (before the whole-run KV check); the Responses API on D comes after that
check, since D computes those prompts itself (no handoff on a pass-through route).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from tests.e2e.conftest import (
    CLUSTER_ENV,
    Cluster,
    KVSources,
    Server,
    kv_delta_when,
    kv_sources,
    scrape,
    wait_healthy,
)

if not os.environ.get(CLUSTER_ENV):
    pytest.skip(f"real-vLLM stage: {CLUSTER_ENV} is not set (run scripts/e2e-vllm.sh)", allow_module_level=True)

pytestmark = pytest.mark.vllm
MODEL = Cluster.load(os.environ[CLUSTER_ENV]).model

MAX_TOKENS = 24
# Random weights may pick the end-of-text token early: ignore it, so every answer has MAX_TOKENS tokens.
SAMPLING: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
KV_SOURCES = "vllm:prompt_tokens_by_source_total"


@dataclass
class Answer:
    text: str
    id: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    header_request_id: str | None


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def unique_prompt(tag: str) -> str:
    """A short prompt (well under vLLM's 128-token CPU block) that no other request shares, so D can
    never serve any of it from its own prefix cache."""
    return f"# {tag} {uuid.uuid4().hex[:12]}\ndef handle_{tag.replace('-', '_')}(request, timeout=30):\n    return"


def messages(tag: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You answer in Python."},
            {"role": "user", "content": unique_prompt(tag)}]


async def ask(base_url: str, kind: str, stream: bool, content: Any, *, request_id: str | None = None,
              max_tokens: int = MAX_TOKENS) -> Answer:
    """One request through the `openai` client; `content` is a prompt (completions) or messages (chat)."""
    headers = {"X-Request-Id": request_id} if request_id else {}
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    async with client(base_url) as api:
        if kind == "completions":
            raw = await api.completions.with_raw_response.create(
                model=MODEL, prompt=content, max_tokens=max_tokens,
                stream=stream, extra_headers=headers, **SAMPLING, **extra)
        else:
            raw = await api.chat.completions.with_raw_response.create(
                model=MODEL, messages=content, max_tokens=max_tokens,
                stream=stream, extra_headers=headers, **SAMPLING, **extra)
        header_id = raw.headers.get("x-request-id")
        parsed = raw.parse()
        if not stream:
            choice = parsed.choices[0]
            text = choice.text if kind == "completions" else choice.message.content
            usage = parsed.usage
            return Answer(text, parsed.id, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                          header_id)
        parts, ids, usage = [], set(), None
        async for chunk in parsed:
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                part = choice.text if kind == "completions" else choice.delta.content
                parts.append(part or "")
        assert len(ids) == 1, f"one id for every chunk of a stream, got {ids}"
        assert usage is not None, "stream_options.include_usage asked for a usage chunk"
        return Answer("".join(parts), ids.pop(), usage.prompt_tokens, usage.completion_tokens,
                      usage.total_tokens, header_id)


async def wait_kv_by_transfer(http: aiohttp.ClientSession, decode: Server, before: KVSources,
                              prompt_tokens: int, *, allow_local_cache: bool = False) -> KVSources:
    """Assert that D took the KV of `prompt_tokens` prompt tokens by transfer and computed none itself."""
    delta = await kv_delta_when(http, decode, before, prompt_tokens)
    assert delta.local_compute == 0, f"D computed {delta.local_compute} prompt tokens itself: {delta}"
    if allow_local_cache:  # blocks D already holds from an earlier transfer need not travel again
        assert delta.external_kv_transfer + delta.local_cache_hit == prompt_tokens, delta
        assert delta.external_kv_transfer > 0, delta
    else:
        assert delta.external_kv_transfer == prompt_tokens, delta
        assert delta.local_cache_hit == 0, delta
    return delta


async def successes(http: aiohttp.ClientSession, server: Server) -> float:
    return (await scrape(http, server.url)).get("vllm:request_success_total")


async def proxy_health(http: aiohttp.ClientSession, proxy: str) -> dict[str, Any]:
    async with http.get(proxy + "/health?verbose=1") as resp:
        return await resp.json()


async def upstream_state(http: aiohttp.ClientSession, proxy: str, url: str) -> str:
    state = await proxy_health(http, proxy)
    return next(u["state"] for u in state["upstreams"] if u["url"] == url)


async def wait_upstream_state(http: aiohttp.ClientSession, proxy: str, url: str, states: set[str],
                              timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (state := await upstream_state(http, proxy, url)) not in states:
        assert time.monotonic() < deadline, f"{url} is {state} in {proxy}, not {states} after {timeout:g}s"
        await asyncio.sleep(0.5)
    return state


# -- the Responses API (a pass-through route: the engine's own answer, byte for byte) ---------------

def response_body(tag: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": unique_prompt(tag), "max_output_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, **extra}


async def post_raw(http: aiohttp.ClientSession, url: str, body: dict[str, Any] | None = None
                   ) -> tuple[int, str, bytes, str | None]:
    """Status, Content-Type, body and X-Request-Id of one POST."""
    async with http.post(url, json=body) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read(), resp.headers.get("X-Request-Id")


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


def output_text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A Responses-API stream, read strictly: every event is `event: TYPE` then `data: JSON` whose `type` is
    TYPE, one blank line after each, and nothing else (no `[DONE]`: this API has none)."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block[:300]
        name, data = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert data["type"] == name, block[:300]
        events.append((name, data))
    return events


def check_response_stream(events: list[tuple[str, dict[str, Any]]], first: int = 0) -> dict[str, Any]:
    """Assert the shape of a one-message text stream (from sequence number `first` on); the final response."""
    names = [name for name, _ in events]
    opening = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"][first:]
    closing = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
               "response.completed"]
    assert names[:len(opening)] == opening and names[-len(closing):] == closing, names
    assert set(names[len(opening):-len(closing)]) == {"response.output_text.delta"}, names
    assert [data["sequence_number"] for _, data in events] == list(range(first, first + len(events)))
    assert len({data["response"]["id"] for _, data in events if "response" in data}) == 1
    assert len({data["item_id"] for _, data in events if "item_id" in data}) == 1
    completed = events[-1][1]["response"]
    deltas = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    if first == 0:
        assert deltas == events[-4][1]["text"] == output_text(completed)
    assert completed["usage"]["output_tokens"] == MAX_TOKENS
    return completed


# -- the basics --------------------------------------------------------------------------------------

async def test_models_are_answered_by_decode(vllm_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with client(vllm_cluster.proxy) as api:
        models = await api.models.list()
    assert [m.id for m in models.data] == [vllm_cluster.model]
    async with http.get(vllm_cluster.decode[0].url + "/v1/models") as resp:
        direct = await resp.json()
    assert [m["id"] for m in direct["data"]] == [m.id for m in models.data]
    assert models.data[0].model_extra.get("max_model_len") == 1024


async def test_tokenize_and_detokenize_pass_through_to_decode(vllm_cluster: Cluster,
                                                             http: aiohttp.ClientSession) -> None:
    body = {"model": vllm_cluster.model, "prompt": "def handle(request, timeout=30):"}
    async with http.post(vllm_cluster.proxy + "/tokenize", json=body) as resp:
        assert resp.status == 200
        through = await resp.json()
    async with http.post(vllm_cluster.decode[0].url + "/tokenize", json=body) as resp:
        direct = await resp.json()
    assert through == direct and through["count"] == len(through["tokens"]) > 0
    async with http.post(vllm_cluster.proxy + "/detokenize",
                         json={"model": vllm_cluster.model, "tokens": through["tokens"]}) as resp:
        assert resp.status == 200
        assert (await resp.json())["prompt"].endswith(body["prompt"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", ["completions", "chat"])
async def test_greedy_output_through_pdproxy_equals_prefill_alone(
    vllm_cluster: Cluster, http: aiohttp.ClientSession, kind: str, stream: bool
) -> None:
    content = unique_prompt(f"{kind}-{stream}") if kind == "completions" else messages(f"{kind}-{stream}")
    reference = await ask(vllm_cluster.prefill[0].url, kind, False, content)  # P alone: no KV handoff
    assert reference.completion_tokens == MAX_TOKENS

    proxy_before = await scrape(http, vllm_cluster.proxy)
    kv_before = await kv_sources(http, vllm_cluster.decode[0])
    request_id = f"e2e-{kind}-{'s' if stream else 'j'}-{uuid.uuid4().hex[:8]}"
    answer = await ask(vllm_cluster.proxy, kind, stream, content, request_id=request_id)

    assert answer.text == reference.text
    assert answer.header_request_id == request_id
    assert answer.id == ("cmpl-" if kind == "completions" else "chatcmpl-") + request_id
    assert (answer.prompt_tokens, answer.completion_tokens) == (reference.prompt_tokens, MAX_TOKENS)
    assert answer.total_tokens == answer.prompt_tokens + answer.completion_tokens
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, answer.prompt_tokens)

    proxy_after = await scrape(http, vllm_cluster.proxy)
    for name, expected in (("pdproxy_prompt_tokens_total", answer.prompt_tokens),
                           ("pdproxy_completion_tokens_total", answer.completion_tokens),
                           ("pdproxy_kv_handoff_missing_total", 0)):
        assert proxy_after.get(name) - proxy_before.get(name) == expected, name


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_batch_of_two_prompts_through_pdproxy_equals_prefill_alone(
    vllm_cluster: Cluster, http: aiohttp.ClientSession, stream: bool
) -> None:
    """A list of prompts fans out into one PD flow per prompt (proxy/fanout.py); the merged answer has the
    engine's shape: choice i is prompt i's text, usage summed, and D took every prompt's KV by transfer."""
    prompts = [unique_prompt(f"batch-{stream}-{i}") for i in range(2)]
    alone = [await ask(vllm_cluster.prefill[0].url, "completions", False, p) for p in prompts]
    kv_before = await kv_sources(http, vllm_cluster.decode[0])
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    async with client(vllm_cluster.proxy) as api:
        answer = await api.completions.create(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS, stream=stream,
                                              **SAMPLING, **extra)
        texts, usage = ["", ""], None
        if stream:
            async for chunk in answer:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    texts[choice.index] += choice.text
        else:
            usage = answer.usage
            for choice in answer.choices:
                texts[choice.index] = choice.text
    assert texts == [a.text for a in alone]
    assert usage is not None and usage.prompt_tokens == sum(a.prompt_tokens for a in alone)
    assert usage.completion_tokens == 2 * MAX_TOKENS
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, usage.prompt_tokens)


async def test_request_id_is_made_when_the_client_sends_none(vllm_cluster: Cluster,
                                                              http: aiohttp.ClientSession) -> None:
    kv_before = await kv_sources(http, vllm_cluster.decode[0])
    answer = await ask(vllm_cluster.proxy, "completions", True, unique_prompt("no-id"))
    assert answer.header_request_id, "pdproxy returns the X-Request-Id it made"
    assert answer.id == f"cmpl-{answer.header_request_id}", "the same id went to D"
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, answer.prompt_tokens)


# -- load --------------------------------------------------------------------------------------------

async def test_32_concurrent_requests_use_both_prefill_servers(vllm_cluster: Cluster,
                                                               http: aiohttp.ClientSession) -> None:
    shapes = [(kind, stream) for kind in ("completions", "chat") for stream in (False, True)]
    cases = []
    for i in range(32):
        kind, stream = shapes[i % 4]
        content = unique_prompt(f"load-{i}") if kind == "completions" else messages(f"load-{i}")
        cases.append((kind, stream, content, f"e2e-load-{i}-{uuid.uuid4().hex[:8]}"))
    # References from P alone, before the counters are read; spread over both prefill servers.
    references = await asyncio.gather(*(
        ask(vllm_cluster.prefill[i % 2].url, kind, False, content) for i, (kind, _, content, _) in enumerate(cases)))

    served_before = [await successes(http, p) for p in vllm_cluster.prefill]
    kv_before = await kv_sources(http, vllm_cluster.decode[0])
    started = time.monotonic()
    answers = await asyncio.gather(*(
        ask(vllm_cluster.proxy, kind, stream, content, request_id=rid) for kind, stream, content, rid in cases))
    elapsed = time.monotonic() - started

    for (kind, stream, _, rid), answer, reference in zip(cases, answers, references, strict=True):
        assert answer.text == reference.text, (kind, stream, rid)
        assert answer.header_request_id == rid
        assert answer.id.endswith(rid)
        assert (answer.prompt_tokens, answer.completion_tokens) == (reference.prompt_tokens, MAX_TOKENS)
    served = [await successes(http, p) - before for p, before in zip(vllm_cluster.prefill, served_before,
                                                                       strict=True)]
    assert sum(served) == 32, f"one prefill per request, got {served}"
    assert all(n > 0 for n in served), f"both prefill servers used, got {served}"
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, sum(a.prompt_tokens for a in answers))
    print(f"32 concurrent requests in {elapsed:.1f} s; prefills per P: {served}")


# -- prefix affinity ---------------------------------------------------------------------------------

async def test_prefix_hash_keeps_a_repeated_prefix_on_one_prefill_server(vllm_cluster: Cluster,
                                                                        http: aiohttp.ClientSession) -> None:
    # Longer than --prefix-hash-chars (1024) and than several of vLLM's 128-token blocks.
    shared = f"# shared context {uuid.uuid4().hex}\n" + "".join(
        f"def step_{i}(state, limit={i}):\n    return state.advance({i}) if state.ready else None\n\n"
        for i in range(24))
    assert len(shared) > 1024
    before = {p.name: await scrape(http, p.url) for p in vllm_cluster.prefill}
    kv_before = await kv_sources(http, vllm_cluster.decode[0])
    answers = []
    for i in range(6):
        answers.append(await ask(vllm_cluster.proxy_prefix_hash, "completions", i % 2 == 1,
                                 shared + f"def final_{i}():\n    return", max_tokens=4))
    after = {p.name: await scrape(http, p.url) for p in vllm_cluster.prefill}

    def delta(name: str, metric: str) -> float:
        return after[name].get(metric) - before[name].get(metric)

    served = {p.name: delta(p.name, "vllm:request_success_total") for p in vllm_cluster.prefill}
    hits = {p.name: delta(p.name, "vllm:prefix_cache_hits_total") for p in vllm_cluster.prefill}
    chosen = [name for name, n in served.items() if n]
    assert len(chosen) == 1 and served[chosen[0]] == 6, f"all 6 prefills on one P, got {served}"
    prompt_tokens = answers[0].prompt_tokens
    assert prompt_tokens > 256
    # Every repeat finds at least the shared prefix's full blocks in that server's prefix cache.
    assert hits[chosen[0]] >= 5 * 256, f"prefix-cache hits {hits}, prompt {prompt_tokens} tokens"
    # D holds the shared blocks from the first transfer; the rest of each prompt still travels.
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, sum(a.prompt_tokens for a in answers),
                              allow_local_cache=True)
    print(f"prefix_hash: prefills {served}, prefix-cache hit tokens {hits}, prompt {prompt_tokens} tokens")


# -- the Responses API on two servers (the prefill pool): by id to the server that made it ----------

async def test_responses_by_id_reach_the_prefill_server_that_made_them(vllm_cluster: Cluster,
                                                                       http: aiohttp.ClientSession) -> None:
    """vLLM keeps stored answers in the memory of the server that made them: GET and cancel by id through
    pdproxy must reach that one server (the other answers 404), including ids pdproxy never saw."""
    proxy = vllm_cluster.proxy_responses_on_prefill
    for server in vllm_cluster.prefill:
        await wait_upstream_state(http, proxy, server.url, {"healthy"}, timeout=90)
    made: dict[str, dict[str, Any]] = {}  # P url -> one answer it made through pdproxy
    for attempt in range(6):  # two at once: least_conn gives them to different servers
        answers = await asyncio.gather(*(post_raw(http, proxy + "/v1/responses", response_body(f"home-{attempt}-{i}"))
                                         for i in range(2)))
        for status, _, raw, _ in answers:
            assert status == 200, raw[:300]
            created = json.loads(raw)
            knows = [(await get_json(http, f"{p.url}/v1/responses/{created['id']}"))[0] for p in vllm_cluster.prefill]
            assert sorted(knows) == [200, 404], f"exactly one server holds {created['id']}: {knows}"
            made.setdefault(vllm_cluster.prefill[knows.index(200)].url, created)
        if len(made) == 2:
            break
    assert len(made) == 2, f"answers made on {list(made)} only"
    for created in made.values():
        status, got = await get_json(http, f"{proxy}/v1/responses/{created['id']}")
        assert status == 200, got
        assert {k: got[k] for k in ("id", "status", "output", "usage")} == \
            {k: created[k] for k in ("id", "status", "output", "usage")}
        # A finished answer cannot be cancelled: its home says so (any other server would answer 404).
        status, _, raw, _ = await post_raw(http, f"{proxy}/v1/responses/{created['id']}/cancel")
        assert status == 400 and json.loads(raw)["error"]["message"] == "Cannot cancel a synchronous response."

    # Ids made on each server directly, never seen by pdproxy: asked around the pool, found on their home.
    for server in vllm_cluster.prefill:
        status, _, raw, _ = await post_raw(http, server.url + "/v1/responses", response_body(f"direct-{server.name}"))
        assert status == 200, raw[:300]
        created = json.loads(raw)
        status, got = await get_json(http, f"{proxy}/v1/responses/{created['id']}")
        assert status == 200 and got["id"] == created["id"] and output_text(got) == output_text(created), got
    status, missing = await get_json(http, f"{proxy}/v1/responses/resp_{uuid.uuid4().hex}")
    assert status == 404 and missing["error"]["type"] == "invalid_request_error", missing


# -- failover (kills a prefill server: keep it last) -------------------------------------------------

async def test_prefill_server_killed_mid_run_requests_fail_over(vllm_cluster: Cluster,
                                                                http: aiohttp.ClientSession) -> None:
    victim, survivor = vllm_cluster.prefill
    proxy = vllm_cluster.proxy
    cases = []
    for i in range(12):
        kind, stream = (("completions", "chat")[i % 2], i % 3 == 0)
        content = unique_prompt(f"failover-{i}") if kind == "completions" else messages(f"failover-{i}")
        cases.append((kind, stream, content))
    references = await asyncio.gather(*(ask(survivor.url, kind, False, content) for kind, _, content in cases))
    proxy_before = await scrape(http, proxy)
    kv_before = await kv_sources(http, vllm_cluster.decode[0])

    # Freeze the victim so that some prefills are certainly in flight on it when it dies, and none
    # of its KV handles is still waiting to be pulled by D.
    victim.signal(signal.SIGSTOP)
    try:
        tasks = [asyncio.ensure_future(ask(proxy, kind, stream, content)) for kind, stream, content in cases]
        deadline = time.monotonic() + 10
        while True:
            state = await proxy_health(http, proxy)
            stuck = next(u["in_flight"] for u in state["upstreams"] if u["url"] == victim.url)
            if stuck or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert stuck > 0, f"no prefill in flight on {victim.url}: {state}"
    finally:
        victim.signal(signal.SIGKILL)
    answers = await asyncio.gather(*tasks)

    for (kind, stream, _), answer, reference in zip(cases, answers, references, strict=True):
        assert answer.text == reference.text, (kind, stream)
        assert answer.completion_tokens == MAX_TOKENS
    proxy_after = await scrape(http, proxy)
    retries = proxy_after.get("pdproxy_prefill_retries_total") - proxy_before.get("pdproxy_prefill_retries_total")
    assert retries >= stuck, f"{stuck} prefills were in flight on the killed server, {retries} retried"
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, sum(a.prompt_tokens for a in answers))

    # Later requests keep working while pdproxy finds out, and after.
    more = await asyncio.gather(*(ask(proxy, "completions", i % 2 == 0, unique_prompt(f"after-kill-{i}"))
                                  for i in range(6)))
    assert all(a.completion_tokens == MAX_TOKENS for a in more)
    deadline = time.monotonic() + 30
    while True:
        state = await proxy_health(http, proxy)
        victim_state = next(u["state"] for u in state["upstreams"] if u["url"] == victim.url)
        if victim_state in ("unhealthy", "ejected") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert victim_state in ("unhealthy", "ejected"), state
    assert state["status"] == "ok" and state["prefill"]["routable"] == 1, state
    print(f"failover: {stuck} prefills in flight on the killed server, {retries:.0f} retried; "
          f"it is now {victim_state}")


async def test_killed_prefill_server_comes_back_and_gets_traffic_again(vllm_cluster: Cluster,
                                                                      http: aiohttp.ClientSession) -> None:
    victim, survivor = vllm_cluster.prefill
    vllm_cluster.restart(victim)
    took = await wait_healthy(http, victim)
    for proxy in (vllm_cluster.proxy, vllm_cluster.proxy_prefix_hash):
        await wait_upstream_state(http, proxy, victim.url, {"healthy"}, timeout=90)

    prompts = [unique_prompt(f"comeback-{i}") for i in range(8)]
    references = await asyncio.gather(*(ask(survivor.url, "completions", False, p) for p in prompts))
    served_before = [await successes(http, p) for p in vllm_cluster.prefill]
    kv_before = await kv_sources(http, vllm_cluster.decode[0])
    answers = await asyncio.gather(*(ask(vllm_cluster.proxy, "completions", i % 2 == 0, p)
                                     for i, p in enumerate(prompts)))
    assert [a.text for a in answers] == [r.text for r in references]
    served = [await successes(http, p) - before for p, before in zip(vllm_cluster.prefill, served_before,
                                                                       strict=True)]
    assert sum(served) == 8 and served[0] > 0, f"the restarted server takes prefills again: {served}"
    # Its KV reaches D: D shook hands with the new engine (a new engine id on the same side channel).
    await wait_kv_by_transfer(http, vllm_cluster.decode[0], kv_before, sum(a.prompt_tokens for a in answers))
    print(f"restarted prefill server healthy after {took:.0f} s; prefills per P: {served}")


async def test_prefill_server_dies_after_handing_its_kv_to_decode(vllm_cluster: Cluster,
                                                                 http: aiohttp.ClientSession) -> None:
    """P answered (its KV handle is on its way to D) and dies before D pulled the KV. D fails the request
    (vLLM's kv_load_failure_policy=fail: 500 non-streamed, a first SSE event {"error": ...} streamed);
    nothing has reached the client yet, so pdproxy reruns the flow: a fresh prefill on the other P,
    and the only D again."""
    victim, survivor = vllm_cluster.prefill
    decode = vllm_cluster.decode[0]
    proxy = vllm_cluster.proxy_prefix_hash  # deterministic: a prefix always goes to the same P
    prefix = ""
    for attempt in range(16):  # find a prefix that prefix_hash sends to the victim
        candidate = f"# handoff probe {attempt} {uuid.uuid4().hex}\n" + "".join(
            f"def stage_{i}(ctx):\n    return ctx.run({i}, retries={attempt})\n\n" for i in range(30))
        before = await successes(http, victim)
        await ask(proxy, "completions", False, candidate + "# probe\n", max_tokens=2)
        if await successes(http, victim) > before:
            prefix = candidate
            break
    assert prefix, "no probe prefix was routed to the victim"
    assert len(prefix) > 1024  # prefix_hash hashes the first --prefix-hash-chars (1024) characters
    cases = [(False, prefix + "def tail_a():\n    return"), (True, prefix + "def tail_b():\n    return")]
    references = [await ask(survivor.url, "completions", False, prompt) for _, prompt in cases]

    served_before = await successes(http, victim)
    reruns_before = (await scrape(http, proxy)).get("pdproxy_flow_retries_total")
    decode.signal(signal.SIGSTOP)  # D takes no KV until the victim is dead
    try:
        tasks = [asyncio.ensure_future(ask(proxy, "completions", stream, prompt)) for stream, prompt in cases]
        deadline = time.monotonic() + 30
        while await successes(http, victim) - served_before < len(cases):  # both prefills answered
            assert time.monotonic() < deadline, "the victim did not answer both prefills"
            await asyncio.sleep(0.1)
        victim.signal(signal.SIGKILL)
        await asyncio.sleep(0.5)
    finally:
        decode.signal(signal.SIGCONT)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = [r if isinstance(r, BaseException) else "ok" for r in results]
    print(f"decode after its prefill server died: {outcomes}")
    for result, reference in zip(results, references, strict=True):
        assert not isinstance(result, BaseException), f"the request failed: {result!r}"
        assert result.text == reference.text
    reruns = (await scrape(http, proxy)).get("pdproxy_flow_retries_total") - reruns_before
    assert reruns == len(cases), f"{reruns} flows rerun, {len(cases)} expected"


# -- the whole run -----------------------------------------------------------------------------------

async def test_whole_run_decode_never_computed_a_prompt(vllm_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """Every request of this run reached D through pdproxy, so D's counters cover them all."""
    decode = await scrape(http, vllm_cluster.decode[0].url)
    external = decode.get(KV_SOURCES, source="external_kv_transfer")
    local = decode.get(KV_SOURCES, source="local_compute")
    assert external > 0 and local == 0, f"D: external_kv_transfer={external}, local_compute={local}"
    for proxy in (vllm_cluster.proxy, vllm_cluster.proxy_prefix_hash):
        assert (await scrape(http, proxy)).get("pdproxy_kv_handoff_missing_total") == 0
    print(f"D over the whole run: {KV_SOURCES} external_kv_transfer={external:.0f} "
          f"local_cache_hit={decode.get(KV_SOURCES, source='local_cache_hit'):.0f} local_compute={local:.0f}")



# -- the Responses API on D (after the whole-run check: a pass-through request has no handoff) --------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_responses_through_pdproxy_equal_decodes_own_answer(vllm_cluster: Cluster,
                                                                  http: aiohttp.ClientSession, stream: bool) -> None:
    decode = vllm_cluster.decode[0]
    body = response_body(f"responses-{stream}")
    if not stream:  # as a user would: the openai client, both ways
        answers = []
        for base_url in (decode.url, vllm_cluster.proxy):
            async with client(base_url) as api:
                answers.append(await api.responses.create(
                    model=MODEL, input=body["input"], max_output_tokens=MAX_TOKENS, temperature=0,
                    extra_body={"ignore_eos": True}))
        own, through = answers
        assert through.output_text == own.output_text and through.output_text
        assert through.usage == own.usage and through.usage.output_tokens == MAX_TOKENS
        assert through.id != own.id and through.id.startswith("resp_")
        return
    own_status, own_type, own_raw, _ = await post_raw(http, decode.url + "/v1/responses", {**body, "stream": True})
    status, content_type, raw, request_id = await post_raw(http, vllm_cluster.proxy + "/v1/responses",
                                                           {**body, "stream": True})
    assert status == own_status == 200 and content_type == own_type and content_type.startswith("text/event-stream")
    assert request_id, "pdproxy's X-Request-Id on a pass-through stream"
    # The same shape, not the same number of deltas: vLLM merges the tokens a slow reader has not taken yet.
    ours, theirs = check_response_stream(sse_events(raw)), check_response_stream(sse_events(own_raw))
    assert output_text(ours) == output_text(theirs) and ours["usage"] == theirs["usage"]


async def test_stored_and_background_responses_by_id_through_pdproxy(vllm_cluster: Cluster,
                                                                     http: aiohttp.ClientSession) -> None:
    """GET, GET streamed and cancel by id through pdproxy, on D (the stage's only decode server: the id's
    home is trivially right here; the two-server case is the prefill-pool test above)."""
    proxy = vllm_cluster.proxy
    status, _, raw, _ = await post_raw(http, proxy + "/v1/responses", response_body("stored"))
    assert status == 200, raw[:300]
    created = json.loads(raw)
    status, got = await get_json(http, f"{proxy}/v1/responses/{created['id']}")
    assert status == 200
    assert {k: got[k] for k in ("id", "status", "output", "usage")} == \
        {k: created[k] for k in ("id", "status", "output", "usage")}

    # Background: a long answer, cancelled through pdproxy while it runs (about 1000 tokens take seconds).
    status, _, raw, _ = await post_raw(http, proxy + "/v1/responses",
                                       response_body("background", background=True, max_output_tokens=960))
    assert status == 200, raw[:300]
    queued = json.loads(raw)
    assert queued["status"] == "queued" and queued["background"] is True
    status, _, raw, _ = await post_raw(http, f"{proxy}/v1/responses/{queued['id']}/cancel")
    assert status == 200 and json.loads(raw)["status"] == "cancelled", raw[:300]
    status, got = await get_json(http, f"{proxy}/v1/responses/{queued['id']}")
    assert status == 200 and got["status"] == "cancelled"

    # Background and streamed: GET ?stream=true&starting_after=N replays the same events from N + 1 on.
    status, _, raw, _ = await post_raw(http, proxy + "/v1/responses",
                                       response_body("background-stream", background=True, stream=True))
    assert status == 200, raw[:300]
    events = sse_events(raw)
    completed = check_response_stream(events)
    async with http.get(f"{proxy}/v1/responses/{completed['id']}", params={"stream": "true", "starting_after": "3"}
                        ) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        replayed = sse_events(await resp.read())
    check_response_stream(replayed, first=4)
    assert replayed == events[4:]
