"""`--pd-min-prompt-tokens` through the real proxy: prompts for which PD does not pay go to D alone."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from pdproxy.settings import Settings
from tests.conftest import ClusterFactory, sse_events

SHORT = "one two three"  # 13 characters: 13 tokens at one character per token
LONG = " ".join(f"word{i}" for i in range(40))  # ~240 characters
FORGED = {"kv_transfer_params": {"do_remote_prefill": True}, "bootstrap_room": 7}


def completion(prompt: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "prompt": prompt, "max_tokens": 3, "stream": stream, **extra}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_short_prompt_goes_to_d_alone_as_a_normal_request(cluster_factory: ClusterFactory,
                                                                  http: aiohttp.ClientSession, stream: bool) -> None:
    cluster = await cluster_factory(pd_min_prompt_tokens=100, chars_per_token=1.0)
    body = {**completion(SHORT, stream), **FORGED}
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert [e.requests for e in cluster.prefill] == [[], []]
    [decode] = cluster.decode[0].requests
    assert decode.body == completion(SHORT, stream)  # the client's body, minus every handoff field
    assert cluster.decode[0].stats.decodes_without_handle == 1
    assert (sse_events(raw)[-1] == b"[DONE]") if stream else orjson.loads(raw)["usage"]["completion_tokens"] == 3
    assert cluster.metric("pdproxy_pd_skipped_total", reason="short_prompt") == 1
    assert cluster.metric("pdproxy_pd_skipped_total", reason="cached_prompt") == 0
    assert cluster.metric("pdproxy_kv_handoff_missing_total") == 0  # not a handoff that went missing


async def test_a_long_prompt_is_disaggregated(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(pd_min_prompt_tokens=100, chars_per_token=1.0)
    async with http.post(cluster.url + "/v1/completions", json=completion(LONG)) as resp:
        assert resp.status == 200
    assert sum(len(e.requests) for e in cluster.prefill) == 1
    assert cluster.decode[0].stats.decodes_with_valid_handle == 1
    assert cluster.metric("pdproxy_pd_skipped_total", reason="short_prompt") == 0


async def test_a_prompt_the_chosen_d_already_holds_skips_prefill(cluster_factory: ClusterFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    """cache_aware's index: the second request shares all but a few characters with the first, on the same D."""
    cluster = await cluster_factory(pd_min_prompt_tokens=100, chars_per_token=1.0, decode_policy="cache_aware",
                                    cache_block_chars=16)
    async with http.post(cluster.url + "/v1/completions", json=completion(LONG)) as resp:
        assert resp.status == 200
    async with http.post(cluster.url + "/v1/completions", json=completion(LONG + " more")) as resp:
        assert resp.status == 200
    assert sum(len(e.requests) for e in cluster.prefill) == 1  # the first one only
    assert cluster.metric("pdproxy_pd_skipped_total", reason="cached_prompt") == 1
    first, second = cluster.decode[0].requests
    assert "kv_transfer_params" in first.body and "kv_transfer_params" not in second.body


async def test_a_skipped_request_whose_d_fails_is_retried_on_another_d(cluster_factory: ClusterFactory,
                                                                        http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_decode=2, pd_min_prompt_tokens=100, chars_per_token=1.0,
                                    decode_policy="round_robin")
    cluster.decode[0].fail_next(503)
    async with http.post(cluster.url + "/v1/completions", json=completion(SHORT)) as resp:
        assert resp.status == 200
    assert [len(d.requests) for d in cluster.decode] == [1, 1]
    assert cluster.metric("pdproxy_flow_retries_total") == 1
    assert [e.requests for e in cluster.prefill] == [[], []]


def test_sglang_refuses_the_threshold_at_start() -> None:
    from pdproxy.app import build_app

    with pytest.raises(ValueError, match="sglang's do not"):
        build_app(Settings(prefill_servers="127.0.0.1:1", decode_servers="127.0.0.1:2", kv_adapter="sglang",
                           pd_min_prompt_tokens=10))
