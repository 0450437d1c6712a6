"""Handoff metadata discovery: what each handoff learns, and how the refresher applies it."""

from __future__ import annotations

from typing import Any

import pytest

from pdproxy.handoff.base import MetadataError
from pdproxy.handoff.discovery import PENDING, MetadataRefresher
from pdproxy.handoff.omni import OmniHandoff
from pdproxy.handoff.sglang import SglangHandoff
from pdproxy.handoff.vllm_mooncake import MooncakeHandoff
from pdproxy.handoff.vllm_nixl import VllmNixlHandoff
from pdproxy.upstreams import Role, State, Upstream, UpstreamPool


class Answers:
    """A scripted `fetch_json`: URL -> JSON value, or an exception to raise."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, url: str) -> Any:
        self.asked.append(url)
        answer = self.answers.get(url, ConnectionRefusedError("connection refused"))
        if isinstance(answer, BaseException):
            raise answer
        return answer


P_URL = "http://10.0.0.1:8100"
INFO = P_URL + "/get_server_info"
QUERY = "http://10.0.0.1:8998/query"


def p() -> Upstream:
    return Upstream(Role.PREFILL, P_URL)


async def test_sglang_discovers_the_bootstrap_port() -> None:
    fetch = Answers({INFO: {"disaggregation_mode": "prefill", "disaggregation_bootstrap_port": 9001, "tp_size": 1}})
    assert await SglangHandoff().discover(p(), fetch) == {"bootstrap_port": 9001}
    assert fetch.asked == [INFO]


@pytest.mark.parametrize(("answer", "message"), [
    ({"disaggregation_mode": "decode", "disaggregation_bootstrap_port": 9001}, "not a prefill server"),
    ({"disaggregation_mode": "prefill"}, "no valid disaggregation_bootstrap_port"),
    ({"disaggregation_bootstrap_port": "9001"}, "no valid disaggregation_bootstrap_port"),
    ([1, 2], "no JSON object"),
    (ConnectionRefusedError("connection refused"), "connection refused"),
    (TimeoutError(), "TimeoutError"),
])
async def test_sglang_discovery_failures(answer: Any, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        await SglangHandoff().discover(p(), Answers({INFO: answer}))


async def test_sglang_override_wins_without_asking() -> None:
    fetch = Answers({})
    handoff = SglangHandoff(overrides={P_URL: {"bootstrap_port": 7000, "bootstrap_host": "10.5.5.5"}})
    assert await handoff.discover(p(), fetch) == {"bootstrap_port": 7000, "bootstrap_host": "10.5.5.5"}
    assert fetch.asked == []


async def test_mooncake_discovers_engine_ids_per_dp_rank() -> None:
    fetch = Answers({QUERY: {"1": {"engine_id": "e1", "worker_addr": {"0": {"0": "tcp://x:1"}}},
                             "0": {"engine_id": "e0", "worker_addr": {}}}})
    meta = await MooncakeHandoff().discover(p(), fetch)
    assert meta == {"bootstrap_addr": "http://10.0.0.1:8998", "engine_ids": [(0, "e0"), (1, "e1")]}


async def test_mooncake_bootstrap_addr_override() -> None:
    fetch = Answers({"http://10.7.7.7:9999/query": {"0": {"engine_id": "e0", "worker_addr": {}}}})
    handoff = MooncakeHandoff({P_URL: {"bootstrap_addr": "http://10.7.7.7:9999/"}})
    assert (await handoff.discover(p(), fetch))["bootstrap_addr"] == "http://10.7.7.7:9999"


@pytest.mark.parametrize(("answer", "message"), [
    ({}, "no prefill worker has registered yet"),
    ({"zero": {"engine_id": "e"}}, "unexpected entry"),
    ({"0": {"worker_addr": {}}}, "unexpected entry"),
    ({"0": "e0"}, "unexpected entry"),
    (OSError("no route to host"), "no route to host"),
])
async def test_mooncake_discovery_failures(answer: Any, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        await MooncakeHandoff().discover(p(), Answers({QUERY: answer}))


@pytest.mark.parametrize("handoff", [VllmNixlHandoff(), OmniHandoff()])
async def test_sequential_handoffs_need_nothing(handoff: Any) -> None:
    up = p()
    refresher = MetadataRefresher(handoff, Answers({}))
    refresher.prepare(up)
    assert up.meta_error is None and up.routable
    assert await refresher.refresh(up) is False


async def test_refresher_pending_then_ok_then_failed_then_changed() -> None:
    changes: list[tuple[dict[str, Any], str | None]] = []
    fetch = Answers({INFO: {"disaggregation_bootstrap_port": 9001}})
    refresher = MetadataRefresher(SglangHandoff(), fetch, on_change=lambda u: changes.append((u.meta, u.meta_error)))
    up, decode = p(), Upstream(Role.DECODE, "http://10.0.0.2:8200")
    pool = UpstreamPool(Role.PREFILL, [up])
    refresher.prepare(up)
    refresher.prepare(decode)
    assert up.meta_error == PENDING and not up.routable and pool.routable() == () and pool.available() == []
    assert decode.meta_error is None  # D needs nothing for SGLang
    assert up.describe()["meta_error"] == PENDING

    assert await refresher.refresh(up) is True
    assert up.meta == {"bootstrap_port": 9001} and up.meta_error is None and pool.routable() == (up,)
    assert await refresher.refresh(up) is False  # nothing new: no change reported

    fetch.answers[INFO] = ConnectionRefusedError("bootstrap gone")
    assert await refresher.refresh(up) is True
    assert not up.routable and "bootstrap gone" in (up.meta_error or "")
    assert up.meta == {"bootstrap_port": 9001}  # last good view kept for operators
    assert up.state is State.UNKNOWN  # health is not touched: only routability
    assert up.describe()["meta_error"] == up.meta_error

    fetch.answers[INFO] = {"disaggregation_bootstrap_port": 9002}  # P restarted on a new port
    assert await refresher.refresh(up) is True
    assert up.meta == {"bootstrap_port": 9002} and up.routable
    assert [error is None for _, error in changes] == [True, False, True]
    assert await refresher.refresh(decode) is False and fetch.asked.count(INFO) == 4


async def test_wrapped_probe_discovers_only_when_healthy() -> None:
    fetch = Answers({INFO: {"disaggregation_bootstrap_port": 9001}})
    refresher = MetadataRefresher(SglangHandoff(), fetch)
    verdicts: list[str | None] = ["GET /health answered 503", None]

    async def health(upstream: Upstream) -> str | None:
        return verdicts.pop(0)

    probe = refresher.wrap(health)
    up = p()
    refresher.prepare(up)
    assert await probe(up) == "GET /health answered 503"
    assert fetch.asked == [] and up.meta_error == PENDING
    assert await probe(up) is None
    assert up.meta == {"bootstrap_port": 9001} and up.routable


async def test_nixl_push_metadata_comes_from_overrides_only() -> None:
    from pdproxy.handoff.vllm_nixl_push import NixlPushHandoff

    fetch = Answers({})
    meta = await NixlPushHandoff({P_URL: {"engine_id": "pf-1"}}).discover(p(), fetch)
    assert meta == {"engine_id": "pf-1", "kv_host": "10.0.0.1", "side_channel_port": 5600, "tp_size": 1, "pp_size": 1}
    assert fetch.asked == []
    with pytest.raises(MetadataError, match="needs this server's NIXL engine_id"):
        await NixlPushHandoff().discover(p(), fetch)
    with pytest.raises(MetadataError, match="side_channel_port must be an integer"):
        await NixlPushHandoff({P_URL: {"engine_id": "e", "side_channel_port": "5600"}}).discover(p(), fetch)


@pytest.mark.parametrize("name", ["sglang", "mooncake", "nixl-push"])
def test_the_app_accepts_every_concurrent_adapter_and_holds_back_its_prefill_servers(name: str) -> None:
    from pdproxy.app import build_app
    from pdproxy.settings import Settings

    app = build_app(Settings(prefill_servers="10.0.0.1:8100", decode_servers="10.0.0.2:8200", kv_adapter=name))
    assert app.flow.handoff.name == name and app.flow.handoff.concurrent
    [prefill], [decode] = app.flow.prefill_pool.members, app.flow.decode_pool.members
    assert prefill.meta_error == PENDING and not prefill.routable  # until its metadata is discovered
    assert decode.meta_error is None


async def test_without_health_checks_metadata_is_fetched_once_and_retried_only_while_missing() -> None:
    import asyncio

    from pdproxy.handoff.discovery import MetadataWithoutHealth

    fetch = Answers({})  # P not up yet: its /get_server_info is refused
    changed = asyncio.Event()
    refresher = MetadataRefresher(SglangHandoff(), fetch, on_change=lambda u: changed.set())
    once = MetadataWithoutHealth(refresher, retry_interval=0.01)
    up, decode = p(), Upstream(Role.DECODE, "http://10.0.0.2:8200")
    once.watch(up)
    once.watch(decode)  # D needs nothing: never fetched, routable at once
    assert up.meta_error == PENDING and decode.meta_error is None and fetch.asked == []  # nothing before start()
    once.start()
    try:
        await asyncio.wait_for(changed.wait(), 1)
        assert "connection refused" in (up.meta_error or "") and not up.routable
        changed.clear()
        fetch.answers[INFO] = {"disaggregation_bootstrap_port": 9001}  # P came up
        await asyncio.wait_for(changed.wait(), 1)
        assert up.meta == {"bootstrap_port": 9001} and up.routable
        asked = len(fetch.asked)
        await asyncio.sleep(0.05)  # no retry once the metadata is in (a quiet period, not a wait for an event)
        assert len(fetch.asked) == asked and all(url == INFO for url in fetch.asked)
    finally:
        await once.stop()
