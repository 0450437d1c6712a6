"""The vLLM NIXL handoff: prefill body, decode body, handle pass-through (through its plan's bytes)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from pdproxy.handoff import HANDOFFS, make_handoff
from pdproxy.handoff.vllm_nixl import VllmNixlHandoff
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

P = Upstream(Role.PREFILL, "http://p:1")
D = Upstream(Role.DECODE, "http://d:2")


class Adapter:
    """The handoff seen through the bytes its plan sends to each leg."""

    def __init__(self) -> None:
        self.handoff = VllmNixlHandoff()

    def _plan(self, body: dict[str, Any]):
        return self.handoff.plan(ProxyRequest("/v1/chat/completions", body, False, "r1", {}), P, D)

    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        call = self._plan(body).prefill
        assert call.path == "/v1/chat/completions" and call.headers == b""
        return orjson.loads(call.body)

    def decode_body(self, body: dict[str, Any], answer: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        call, has_handle = self._plan(body).decode(answer)
        return orjson.loads(call.body), has_handle

PREFILL_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# What a vLLM prefill engine answers in `kv_transfer_params` (NixlConnector), plus keys a newer or
# other connector might add: the proxy must not care.
HANDLE: dict[str, Any] = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[1, 2, 3], [4, 5]],
    "remote_engine_id": "engine-7f3a",
    "remote_host": "10.9.8.7",  # the KV side channel: not the HTTP address of P
    "remote_port": 5600,
    "tp_size": 2,
    "remote_request_id": "cmpl-abc",
    "extra": {"nested": [1, {"deep": None}], "flag": True},
}


def chat_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "llama",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 200,
        "temperature": 0.3,
        "seed": 11,
        "logprobs": True,
        "top_p": 0.9,
    }
    body.update(extra)
    return body


@pytest.fixture
def adapter() -> Adapter:
    return Adapter()


# ---------------------------------------------------------------- prefill body


def test_prefill_body_shape(adapter: Adapter) -> None:
    prefill = adapter.prefill_body(chat_body())
    assert prefill["stream"] is False
    assert prefill["max_tokens"] == 1
    assert "stream_options" not in prefill
    assert "max_completion_tokens" not in prefill  # the client did not send it
    assert prefill["kv_transfer_params"] == PREFILL_REQUEST
    assert list(prefill["kv_transfer_params"]) == list(PREFILL_REQUEST)
    assert prefill["kv_transfer_params"]["do_remote_decode"] is True
    assert prefill["kv_transfer_params"]["do_remote_prefill"] is False


def test_prefill_body_keeps_every_other_key(adapter: Adapter) -> None:
    body = chat_body()
    prefill = adapter.prefill_body(body)
    changed = {"stream", "max_tokens", "stream_options", "kv_transfer_params"}
    assert {k: v for k, v in prefill.items() if k not in changed} == {
        k: v for k, v in body.items() if k not in changed
    }


@pytest.mark.parametrize("stream", [True, False, None])
def test_prefill_is_never_streamed(adapter: Adapter, stream: bool | None) -> None:
    body = chat_body(stream=stream)
    if stream is None:
        del body["stream"]
    assert adapter.prefill_body(body)["stream"] is False


def test_prefill_without_max_tokens_gets_one(adapter: Adapter) -> None:
    body = {"model": "m", "prompt": "hello"}
    assert adapter.prefill_body(body) == {"model": "m", "prompt": "hello", "stream": False, "max_tokens": 1,
                                          "kv_transfer_params": PREFILL_REQUEST}


def test_prefill_max_completion_tokens_only_if_sent(adapter: Adapter) -> None:
    prefill = adapter.prefill_body(chat_body(max_completion_tokens=500))
    assert prefill["max_completion_tokens"] == 1
    assert prefill["max_tokens"] == 1
    assert "max_completion_tokens" not in adapter.prefill_body(chat_body())


def test_prefill_drops_min_tokens(adapter: Adapter) -> None:
    prefill = adapter.prefill_body(chat_body(min_tokens=20, min_completion_tokens=30))
    assert "min_tokens" not in prefill
    assert "min_completion_tokens" not in prefill


def test_prefill_replaces_a_client_sent_kv_transfer_params(adapter: Adapter) -> None:
    prefill = adapter.prefill_body(chat_body(kv_transfer_params={"do_remote_prefill": True, "remote_host": "evil"}))
    assert prefill["kv_transfer_params"] == PREFILL_REQUEST


def test_prefill_does_not_mutate_the_client_body(adapter: Adapter) -> None:
    body = chat_body(max_completion_tokens=5, min_tokens=2, kv_transfer_params={"x": 1})
    snapshot = copy.deepcopy(body)
    adapter.prefill_body(body)
    assert body == snapshot


def test_prefill_request_blocks_are_independent(adapter: Adapter) -> None:
    first = adapter.prefill_body(chat_body())
    first["kv_transfer_params"]["remote_host"] = "changed"
    assert adapter.prefill_body(chat_body())["kv_transfer_params"] == PREFILL_REQUEST


# ---------------------------------------------------------------- decode body


def prefill_answer(handle: Any = HANDLE, *, with_key: bool = True) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
    if with_key:
        answer["kv_transfer_params"] = handle
    return answer


def test_decode_body_is_the_original_plus_the_handle(adapter: Adapter) -> None:
    body = chat_body()
    snapshot = copy.deepcopy(body)
    answer = prefill_answer(copy.deepcopy(HANDLE))
    decode, has_handle = adapter.decode_body(body, answer)
    assert has_handle is True
    assert decode["kv_transfer_params"] == HANDLE
    assert {k: v for k, v in decode.items() if k != "kv_transfer_params"} == snapshot
    assert decode["stream"] is True and decode["max_tokens"] == 200  # the client's own values
    assert decode["stream_options"] == {"include_usage": True}
    assert body == snapshot  # the client's body is not mutated


def test_decode_handle_is_never_rewritten(adapter: Adapter) -> None:
    answer = prefill_answer(copy.deepcopy(HANDLE))
    decode, _ = adapter.decode_body(chat_body(), answer)
    handle = decode["kv_transfer_params"]
    assert handle["remote_host"] == "10.9.8.7"
    assert handle["remote_port"] == 5600
    assert handle["extra"] == {"nested": [1, {"deep": None}], "flag": True}
    assert set(handle) == set(HANDLE)
    assert answer == prefill_answer(HANDLE)  # the prefill answer is left as it came


def test_decode_replaces_a_client_sent_kv_transfer_params(adapter: Adapter) -> None:
    body = chat_body(kv_transfer_params={"remote_host": "client-chosen"})
    decode, has_handle = adapter.decode_body(body, prefill_answer(HANDLE))
    assert has_handle is True
    assert decode["kv_transfer_params"] == HANDLE
    assert body["kv_transfer_params"] == {"remote_host": "client-chosen"}


@pytest.mark.parametrize("with_key", [True, False], ids=["null-handle", "no-handle"])
def test_decode_without_a_handle(adapter: Adapter, with_key: bool) -> None:
    body = chat_body()
    snapshot = copy.deepcopy(body)
    decode, has_handle = adapter.decode_body(body, prefill_answer(None, with_key=with_key))
    assert has_handle is False
    assert decode == snapshot
    assert "kv_transfer_params" not in decode
    assert body == snapshot


@pytest.mark.parametrize("with_key", [True, False], ids=["null-handle", "no-handle"])
def test_decode_without_a_handle_strips_a_client_sent_one(adapter: Adapter, with_key: bool) -> None:
    body = chat_body(kv_transfer_params={"do_remote_prefill": True, "remote_host": "client-chosen"})
    snapshot = copy.deepcopy(body)
    decode, has_handle = adapter.decode_body(body, prefill_answer(None, with_key=with_key))
    assert has_handle is False
    assert "kv_transfer_params" not in decode
    assert decode == {k: v for k, v in snapshot.items() if k != "kv_transfer_params"}
    assert body == snapshot


def test_full_round_trip_completions(adapter: Adapter) -> None:
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 16, "stream": True, "echo": False}
    prefill = adapter.prefill_body(body)
    assert prefill["prompt"] == [1, 2, 3]
    decode, has_handle = adapter.decode_body(body, {"choices": [], "kv_transfer_params": {"remote_port": 1}})
    assert has_handle is True
    assert decode == {**body, "kv_transfer_params": {"remote_port": 1}}


# ---------------------------------------------------------------- registry


def test_make_handoff_vllm() -> None:
    assert isinstance(make_handoff("vllm"), VllmNixlHandoff)


def test_make_handoff_unknown_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        make_handoff("mooncake-push")
    assert "mooncake-push" in str(info.value)
    for name in HANDOFFS:
        assert name in str(info.value)
