"""omni, sglang and mooncake handoffs: the exact bytes each leg of a plan carries."""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

import orjson
import pytest

from pdproxy.handoff import HANDOFFS, make_handoff
from pdproxy.handoff.base import HANDOFF_FIELDS
from pdproxy.handoff.omni import OmniHandoff
from pdproxy.handoff.rooms import RoomRegistry
from pdproxy.handoff.sglang import SglangHandoff, batch_size
from pdproxy.handoff.vllm_mooncake import MooncakeHandoff
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

CLIENT_HANDOFF = {  # what a client might try to slip through: never forwarded
    "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "evil"},
    "bootstrap_host": "evil", "bootstrap_port": 1, "bootstrap_room": 7, "disagg_prefill_dp_rank": 3,
}


def chat(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "stream_options": {"include_usage": True}, "max_tokens": 50, "temperature": 0.2}
    body.update(extra)
    return body


def req(body: dict[str, Any], endpoint: str = "/v1/chat/completions") -> ProxyRequest:
    return ProxyRequest(endpoint, body, bool(body.get("stream")), "r1", {"X-Request-Id": "r1"})


def loads(raw: bytes) -> dict[str, Any]:
    return orjson.loads(raw)  # type: ignore[no-any-return]


def prefill_up(url: str = "http://10.0.0.1:8100", **meta: Any) -> Upstream:
    up = Upstream(Role.PREFILL, url)
    up.meta = meta
    return up


D = Upstream(Role.DECODE, "http://10.0.0.2:8200")


# ---------------------------------------------------------------- omni


def test_omni_prefill_gets_one_token_and_no_request_block() -> None:
    body = chat(max_completion_tokens=40, min_tokens=3, **CLIENT_HANDOFF)
    snapshot = copy.deepcopy(body)
    plan = OmniHandoff().plan(req(body), prefill_up(), D)
    assert plan.prefill.path == "/v1/chat/completions" and plan.prefill.headers == b""
    assert loads(plan.prefill.body) == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                        "stream": False, "max_tokens": 1, "max_completion_tokens": 1,
                                        "temperature": 0.2}
    assert body == snapshot


def test_omni_decode_gets_the_client_body_plus_p_params_unchanged() -> None:
    body = chat(**CLIENT_HANDOFF)
    handle = {"remote_block_ids": [1, 2], "remote_cluster_id": "c9", "remote_host_ip": "tcp://10.1.1.1:5568",
              "spec_token_ids": None, "remote_dp_rank": 0, "remote_request_id": "chatcmpl-r1"}
    call, has_handle = OmniHandoff().plan(req(body), prefill_up(), D).decode({"choices": [],
                                                                           "kv_transfer_params": handle})
    assert has_handle is True and call.headers == b""
    clean = {k: v for k, v in body.items() if k not in HANDOFF_FIELDS}
    assert loads(call.body) == {**clean, "kv_transfer_params": handle}


def test_omni_decode_without_params_recomputes_and_forwards_nothing_of_the_client() -> None:
    body = chat(**CLIENT_HANDOFF)
    call, has_handle = OmniHandoff().plan(req(body), prefill_up(), D).decode({"choices": []})
    assert has_handle is False
    assert loads(call.body) == {k: v for k, v in body.items() if k not in HANDOFF_FIELDS}


def test_omni_is_sequential_without_metadata() -> None:
    assert OmniHandoff.concurrent is False and OmniHandoff.meta_roles == frozenset()


# ---------------------------------------------------------------- sglang


def sglang(seed: int = 1) -> SglangHandoff:
    return SglangHandoff(RoomRegistry(random.Random(seed)))


def test_sglang_both_legs_get_the_same_body_with_bootstrap_fields() -> None:
    body = chat(**CLIENT_HANDOFF)
    snapshot = copy.deepcopy(body)
    handoff = sglang()
    plan = handoff.plan(req(body), prefill_up(bootstrap_port=8998), D)
    call, has_handle = plan.decode(None)
    assert call == plan.prefill and has_handle is True
    sent = loads(plan.prefill.body)
    room = sent.pop("bootstrap_room")
    assert sent == {**{k: v for k, v in snapshot.items() if k not in HANDOFF_FIELDS},
                    "bootstrap_host": "10.0.0.1", "bootstrap_port": 8998}
    assert sent["stream"] is True and sent["max_tokens"] == 50  # unchanged: P and D both run the request
    assert isinstance(room, int) and 0 <= room < 2**63 and plan.rooms == (room,)
    assert body == snapshot


def test_sglang_null_port_and_host_override_and_ipv6() -> None:
    sent = loads(sglang().plan(req(chat()), prefill_up("http://[::1]:8100", bootstrap_port=None), D).prefill.body)
    assert sent["bootstrap_host"] == "[::1]" and sent["bootstrap_port"] is None
    sent = loads(sglang().plan(req(chat()), prefill_up(bootstrap_port=1, bootstrap_host="10.9.9.9"), D).prefill.body)
    assert sent["bootstrap_host"] == "10.9.9.9"


@pytest.mark.parametrize(("endpoint", "extra", "size"), [
    ("/v1/completions", {"prompt": ["a", "b", "c"]}, 3),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, 2),
    ("/v1/completions", {"prompt": ["only"]}, 1),
    ("/v1/completions", {"prompt": [1, 2, 3]}, None),
    ("/v1/completions", {"prompt": "one"}, None),
    ("/v1/chat/completions", {"n": 4}, 4),
    ("/v1/chat/completions", {"n": 1}, None),
])
def test_sglang_batches_get_arrays(endpoint: str, extra: dict[str, Any], size: int | None) -> None:
    body = {"model": "m", "max_tokens": 5, **extra}
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "x"}]
    assert batch_size(endpoint, body) == size
    plan = sglang().plan(req(body, endpoint), prefill_up(bootstrap_port=9000), D)
    sent = loads(plan.prefill.body)
    if size is None:
        assert sent["bootstrap_host"] == "10.0.0.1" and sent["bootstrap_port"] == 9000
        assert sent["bootstrap_room"] == plan.rooms[0]
    else:
        assert sent["bootstrap_host"] == ["10.0.0.1"] * size and sent["bootstrap_port"] == [9000] * size
        assert sent["bootstrap_room"] == list(plan.rooms) and len(set(plan.rooms)) == size


def test_sglang_rooms_are_released_by_close() -> None:
    handoff = sglang()
    plans = [handoff.plan(req({"model": "m", "prompt": ["a", "b"]}, "/v1/completions"),
                          prefill_up(bootstrap_port=1), D) for _ in range(3)]
    assert len(handoff.rooms) == 6
    for plan in plans:
        plan.close()
        plan.close()  # idempotent
    assert len(handoff.rooms) == 0


def test_room_registry_redraws_a_room_in_flight() -> None:
    class Repeats(random.Random):
        def __init__(self) -> None:
            super().__init__()
            self.draws = iter([5, 5, 5, 9])

        def getrandbits(self, k: int) -> int:
            return next(self.draws)

    registry = RoomRegistry(Repeats())
    assert registry.take() == (5,)
    assert registry.take() == (9,)  # the two clashing draws of 5 were thrown away


def test_ten_thousand_rooms_in_flight_are_unique() -> None:
    handoff = SglangHandoff()  # the real rng
    request, prefill = req(chat()), prefill_up(bootstrap_port=1)
    plans = [handoff.plan(request, prefill, D) for _ in range(10_000)]  # all in flight at once
    rooms = [loads(plan.prefill.body)["bootstrap_room"] for plan in plans]
    assert len(set(rooms)) == 10_000 and len(handoff.rooms) == 10_000
    for plan in plans:
        plan.close()
    assert len(handoff.rooms) == 0


async def test_rooms_of_concurrent_requests_never_meet() -> None:
    handoff = SglangHandoff()
    request, prefill = req(chat()), prefill_up(bootstrap_port=1)
    live: set[int] = set()
    clashes = 0

    async def one(i: int) -> None:
        nonlocal clashes
        plan = handoff.plan(request, prefill, D)
        room = plan.rooms[0]
        clashes += room in live
        live.add(room)
        try:
            for _ in range(i % 3):  # interleave: plans open and close in varying order
                await asyncio.sleep(0)
        finally:
            live.discard(room)
            plan.close()

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(2000))), 5)
    assert clashes == 0 and len(handoff.rooms) == 0


def test_sglang_is_concurrent_and_needs_prefill_metadata() -> None:
    assert SglangHandoff.concurrent is True and SglangHandoff.cancel_decode_on_prefill_failure is True
    assert SglangHandoff.meta_roles == frozenset({Role.PREFILL})


# ---------------------------------------------------------------- mooncake

MOONCAKE_META = {"bootstrap_addr": "http://10.0.0.1:8998", "engine_ids": [(0, "eng-a"), (1, "eng-b")]}


def mooncake() -> MooncakeHandoff:
    ids = iter(f"id{i}" for i in range(100))
    return MooncakeHandoff(new_id=lambda: next(ids))


def test_mooncake_prefill_and_decode_bytes() -> None:
    body = chat(max_completion_tokens=9, **CLIENT_HANDOFF)
    snapshot = copy.deepcopy(body)
    plan = mooncake().plan(req(body), prefill_up(**MOONCAKE_META), D)
    clean = {k: v for k, v in snapshot.items() if k not in HANDOFF_FIELDS}
    assert plan.prefill.path == "/v1/chat/completions"
    assert plan.prefill.headers == b"X-data-parallel-rank: 0\r\n"
    assert loads(plan.prefill.body) == {
        **{k: v for k, v in clean.items() if k != "stream_options"},
        "stream": False, "max_tokens": 1, "max_completion_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "transfer_id": "xfer-id0"},
    }
    call, has_handle = plan.decode(None)
    assert has_handle is True and call.headers == b"" and call.path == "/v1/chat/completions"
    assert loads(call.body) == {**clean, "kv_transfer_params": {
        "do_remote_decode": False, "do_remote_prefill": True, "remote_bootstrap_addr": "http://10.0.0.1:8998",
        "remote_engine_id": "eng-a", "transfer_id": "xfer-id0"}}
    assert body == snapshot


def test_mooncake_spreads_over_dp_ranks_with_a_fresh_transfer_id_each_attempt() -> None:
    handoff = mooncake()
    prefill = prefill_up(**MOONCAKE_META)
    seen = []
    for _ in range(4):
        plan = handoff.plan(req(chat()), prefill, D)
        decode_params = loads(plan.decode(None)[0].body)["kv_transfer_params"]
        seen.append((plan.prefill.headers, decode_params["remote_engine_id"], decode_params["transfer_id"]))
    rank0, rank1 = (b"X-data-parallel-rank: 0\r\n", "eng-a"), (b"X-data-parallel-rank: 1\r\n", "eng-b")
    assert [s[:2] for s in seen] == [rank0, rank1] * 2
    assert len({s[2] for s in seen}) == 4


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["vllm", "omni", "sglang", "mooncake", "nixl-push"])
def test_every_adapter_is_registered(name: str) -> None:
    handoff = make_handoff(name, concurrent_ok=True)
    assert type(handoff) is HANDOFFS[name] and handoff.name == name


@pytest.mark.parametrize("name", ["sglang", "mooncake", "nixl-push"])
def test_concurrent_adapters_need_a_request_path_that_runs_them(name: str) -> None:
    with pytest.raises(ValueError, match=f"kv adapter '{name}' calls prefill and decode at once") as info:
        make_handoff(name)
    assert "usable now: omni, vllm" in str(info.value)


def test_overrides_reach_the_handoffs_that_take_them() -> None:
    handoff = make_handoff("mooncake", {"http://10.0.0.1:8100": {"bootstrap_port": 9100}}, concurrent_ok=True)
    assert isinstance(handoff, MooncakeHandoff)
    assert handoff.bootstrap_addr(prefill_up()) == "http://10.0.0.1:9100"
    assert handoff.bootstrap_addr(prefill_up("http://10.0.0.5:8100")) == "http://10.0.0.5:8998"


# ---------------------------------------------------------------- nixl-push

PUSH_META = {"engine_id": "pf-1", "kv_host": "10.9.0.1", "side_channel_port": 5601, "tp_size": 2, "pp_size": 1}


def test_nixl_push_prefill_and_decode_bytes() -> None:
    from pdproxy.handoff.vllm_nixl_push import NixlPushHandoff

    body = chat(**CLIENT_HANDOFF)
    snapshot = copy.deepcopy(body)
    plan = NixlPushHandoff(new_id=lambda: "t1").plan(req(body), prefill_up(**PUSH_META), D)
    clean = {k: v for k, v in snapshot.items() if k not in HANDOFF_FIELDS}
    assert plan.prefill.headers == b""
    assert loads(plan.prefill.body) == {
        **{k: v for k, v in clean.items() if k != "stream_options"}, "stream": False, "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                               "remote_block_ids": None, "remote_host": None, "remote_port": None,
                               "transfer_id": "xfer-t1"},
    }
    call, has_handle = plan.decode(None)
    assert has_handle is True and call.headers == b""
    assert loads(call.body) == {**clean, "kv_transfer_params": {
        "do_remote_decode": False, "do_remote_prefill": True, "remote_engine_id": "pf-1", "remote_host": "10.9.0.1",
        "remote_port": 5601, "tp_size": 2, "pp_size": 1, "remote_request_id": "r1", "transfer_id": "xfer-t1"}}
    assert "remote_block_ids" not in loads(call.body)["kv_transfer_params"]  # D allocates, P writes
