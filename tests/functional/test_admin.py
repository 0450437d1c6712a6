"""Runtime membership through /admin/upstreams: scale out and in with zero failed requests."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from pdproxy.admin import AdminApi
from pdproxy.app import MEMBERSHIP, build_app
from pdproxy.membership import StateFileError
from pdproxy.mock import MockConfig, start_mock
from pdproxy.settings import Settings
from pdproxy.upstreams import Role, State
from tests.conftest import Cluster, ClusterFactory
from tests.functional.test_resilience import FAST_HEALTH, STREAM, load, send

SRC = str(Path(__file__).resolve().parents[2] / "src")


async def admin(http: aiohttp.ClientSession, cluster: Cluster, method: str, path: str = "", body: Any = None,
                token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
    headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    async with http.request(method, cluster.url + "/admin/upstreams" + path, json=body, headers=headers,
                            **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


# -- security -----------------------------------------------------------------------------------

async def test_without_a_token_only_direct_loopback_clients_get_in(cluster: Cluster,
                                                                    http: aiohttp.ClientSession) -> None:
    status, body = await admin(http, cluster, "GET")
    assert status == 200 and len(body["upstreams"]) == 3
    status, body = await admin(http, cluster, "GET", headers={"X-Forwarded-For": "203.0.113.7"})
    assert status == 403
    assert "loopback" in body["error"]["message"]


def test_non_loopback_client_without_token_is_refused() -> None:
    api = AdminApi(membership=None, token=None, default_caps={})  # type: ignore[arg-type]
    for peer, allowed in ((("127.0.0.1", 5000), True), (("::1", 5000, 0, 0), True), (("192.0.2.10", 5000), False)):
        request = make_mocked_request("GET", "/admin/upstreams", transport=_Transport(peer))
        if allowed:
            api.authorize(request)
        else:
            with pytest.raises(Exception, match="loopback"):
                api.authorize(request)


class _Transport:
    def __init__(self, peer: tuple[Any, ...]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False


async def test_token_is_required_when_configured(cluster_factory: ClusterFactory,
                                                 http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(admin_token="s3cret")
    for token in (None, "wrong", "s3cret2", "S3CRET"):
        status, body = await admin(http, cluster, "GET", token=token)
        assert status == 401, token
        assert body["error"]["type"] == "authentication_error"
    async with http.get(cluster.url + "/admin/upstreams", headers={"Authorization": "Basic s3cret"}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    status, _ = await admin(http, cluster, "GET", token="s3cret")
    assert status == 200


@pytest.mark.parametrize(("body", "contains"), [
    ({"role": "router", "url": "h:1"}, "role"),
    ({"role": "prefill", "url": "ftp://h:1"}, "scheme must be http or https"),
    ({"role": "prefill", "url": "h:0"}, "port must be 1-65535"),
    ({"role": "prefill", "url": "h:70000"}, "port must be 1-65535"),
    ({"role": "prefill", "url": "http://:80"}, "missing host"),
    ({"role": "prefill", "url": "h"}, "missing port"),
    ({"role": "prefill", "url": "h:1/v1"}, "only scheme://host:port"),
    ({"role": "prefill", "url": "h:1", "weight": 0}, "weight"),
    ({"role": "prefill", "url": "h:1", "weight": 1001}, "weight"),
    ({"role": "prefill", "url": "h:1", "weight": "2"}, "weight"),
    ({"role": "prefill", "url": "h:1", "colour": "red"}, "colour"),
    ({"url": "h:1"}, "role"),
    ([], "a list of 1 to 256"),
    ([{"role": "prefill", "url": "h:1"}] * 257, "a list of 1 to 256"),
    ([{"role": "prefill", "url": "h:1"}, {"role": "decode", "url": "bad:port"}], "upstream 1"),
    ("just a string", "must be a JSON object"),
])
async def test_bad_admin_input_gets_400_and_changes_nothing(
    cluster: Cluster, http: aiohttp.ClientSession, body: Any, contains: str
) -> None:
    status, answer = await admin(http, cluster, "POST", body=body)
    assert status == 400, answer
    assert contains in answer["error"]["message"]
    assert len(cluster.app[MEMBERSHIP].members()) == 3


async def test_admin_body_size_json_and_unknown_ids(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    async with http.post(cluster.url + "/admin/upstreams", data=b"x" * 70_000) as resp:
        assert resp.status == 413
    async with http.post(cluster.url + "/admin/upstreams", data=b"{nope") as resp:
        assert resp.status == 400
    assert (await admin(http, cluster, "DELETE", "/u999999"))[0] == 404
    assert (await admin(http, cluster, "PATCH", "/u999999", body={"weight": 2}))[0] == 404
    assert (await admin(http, cluster, "DELETE", params={"role": "prefill"}))[0] == 400
    assert (await admin(http, cluster, "DELETE", params={"role": "prefill", "url": "h:1"}))[0] == 404
    upstream_id = cluster.flow.prefill_pool.members[0].id
    status, answer = await admin(http, cluster, "PATCH", f"/{upstream_id}", body={})
    assert status == 400 and "weight" in answer["error"]["message"]


# -- membership changes ---------------------------------------------------------------------------

async def test_added_prefill_takes_traffic_after_its_first_good_probe(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(n_prefill=1, **FAST_HEALTH)
    engine, runner, url = await start_mock(MockConfig(role="prefill"))
    cluster.engine_runners[id(engine)] = runner
    engine.healthy = False  # still loading its weights
    status, body = await admin(http, cluster, "POST", body={"role": "prefill", "url": url})
    assert status == 201
    assert body["upstream"]["state"] == "warming" and body["upstream"]["created"] is True
    assert await load(http, cluster, 10, 2) == Counter({"ok": 10})
    assert engine.stats.prefills == 0  # no traffic while warming
    engine.healthy = True
    await cluster.wait_state(url, State.HEALTHY)
    assert await load(http, cluster, 10, 2) == Counter({"ok": 10})
    assert engine.stats.prefills >= 3
    status, body = await admin(http, cluster, "POST", body={"role": "prefill", "url": url, "weight": 2})
    assert status == 200 and body["upstream"]["created"] is False  # idempotent
    assert len(cluster.flow.prefill_pool.members) == 2 and cluster.upstream(url).weight == 2
    assert cluster.metric("pdproxy_admin_changes_total", action="add") == 1


async def test_skip_warmup_and_bulk_add(cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=1, **FAST_HEALTH)
    urls = []
    for _ in range(2):
        engine, runner, url = await start_mock(MockConfig(role="prefill"))
        cluster.engine_runners[id(engine)] = runner
        urls.append(url)
    status, body = await admin(http, cluster, "POST", body=[
        {"role": "prefill", "url": urls[0], "skip_warmup": True}, {"role": "prefill", "url": urls[1]}])
    assert status == 201
    assert [u["state"] for u in body["upstreams"]] == ["unknown", "warming"]
    assert cluster.upstream(urls[0]).routable  # routable at once


async def test_removing_a_decode_server_with_streams_open_drops_nothing(
    cluster_factory: ClusterFactory, http: aiohttp.ClientSession
) -> None:
    cluster = await cluster_factory(n_decode=2, decode_config=MockConfig(role="decode", itl_ms=10))
    leaving, url = cluster.decode[0], cluster.decode_urls[0]
    streams = [asyncio.create_task(send(http, cluster, STREAM | {"max_tokens": 40})) for _ in range(6)]
    await leaving.wait_until(lambda stats: stats.in_flight >= 1)
    status, body = await admin(http, cluster, "DELETE", f"/{cluster.upstream(url).id}")
    assert status == 202 and body["removed"] is False and "draining" in body["message"]
    before = len(leaving.requests)
    assert await load(http, cluster, 10, 3) == Counter({"ok": 10})  # none of these go to the leaving one
    assert len(leaving.requests) == before
    assert await asyncio.gather(*streams) == ["ok"] * 6  # every open stream completed
    await cluster.wait_for(lambda: len(cluster.flow.decode_pool.members) == 1)
    assert leaving.stats.aborted == 0
    assert cluster.metric("pdproxy_upstream_requests_total", role="decode", upstream=url, outcome="ok") == 0


async def test_force_remove_cuts_open_streams(cluster_factory: ClusterFactory,
                                              http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(decode_config=MockConfig(role="decode", itl_ms=20))
    engine, runner, url = await start_mock(MockConfig(role="decode"))
    cluster.engine_runners[id(engine)] = runner
    await admin(http, cluster, "POST", body={"role": "decode", "url": url, "skip_warmup": True})
    victim = cluster.decode_urls[0]
    await admin(http, cluster, "PATCH", f"/{cluster.upstream(url).id}", body={"drain": True})  # only the victim
    stream = asyncio.create_task(http.post(cluster.url + "/v1/completions", json=STREAM | {"max_tokens": 500}))
    await cluster.decode[0].wait_until(lambda stats: stats.in_flight == 1)
    status, body = await admin(http, cluster, "DELETE", params={"role": "decode", "url": victim, "force": "true"})
    assert status == 200 and body["removed"] is True
    async with await stream as resp:
        payload = await resp.read()
    assert b"removed by an operator" in payload and not payload.endswith(b"[DONE]\n\n")
    await cluster.decode[0].wait_idle()  # the decode connection was closed
    assert [u.url for u in cluster.flow.decode_pool.members] == [url]
    await admin(http, cluster, "PATCH", f"/{cluster.upstream(url).id}", body={"drain": False})
    assert await send(http, cluster) == "ok"


async def test_patch_weight_and_drain(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    upstream = cluster.flow.prefill_pool.members[0]
    status, body = await admin(http, cluster, "PATCH", f"/{upstream.id}", body={"weight": 5})
    assert status == 200 and body["upstream"]["weight"] == 5 and upstream.weight == 5
    status, body = await admin(http, cluster, "PATCH", f"/{upstream.id}", body={"drain": True})
    assert body["upstream"]["state"] == "draining"
    assert await load(http, cluster, 6, 2) == Counter({"ok": 6})
    assert cluster.prefill[0].stats.prefills == 0
    status, body = await admin(http, cluster, "PATCH", f"/{upstream.id}", body={"drain": False})
    assert body["upstream"]["state"] == "unknown"
    assert len(cluster.flow.prefill_pool.members) == 2  # drained, never removed


async def test_removed_upstream_series_disappear(cluster_factory: ClusterFactory,
                                                 http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(n_prefill=2, prefill_policy="round_robin")
    assert await load(http, cluster, 4, 1) == Counter({"ok": 4})
    url = cluster.prefill_urls[0]
    async with http.get(cluster.url + "/metrics") as resp:
        assert url in await resp.text()
    status, body = await admin(http, cluster, "DELETE", params={"role": "prefill", "url": url})
    assert status == 200 and body["removed"] is True  # idle: removed at once
    async with http.get(cluster.url + "/metrics") as resp:
        assert url not in await resp.text()


async def test_scale_1p1d_to_3p2d_and_back_under_load(cluster_factory: ClusterFactory,
                                                      http: aiohttp.ClientSession) -> None:
    """The operator's story: grow and shrink while a load generator runs, with zero failures."""
    cluster = await cluster_factory(n_prefill=1, n_decode=1, decode_config=MockConfig(role="decode", itl_ms=2),
                                    **FAST_HEALTH)
    extra = []
    for role in ("prefill", "prefill", "decode"):
        engine, runner, url = await start_mock(MockConfig(role=role, itl_ms=2))
        cluster.engine_runners[id(engine)] = runner
        extra.append((role, url, engine))
    results: Counter[str] = Counter()
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            results.update(await load(http, cluster, 8, 4))

    generator = asyncio.create_task(traffic())
    status, _ = await admin(http, cluster, "POST", body=[{"role": r, "url": u} for r, u, _ in extra])
    assert status == 201
    for _, url, _ in extra:
        await cluster.wait_state(url, State.HEALTHY)
    for _, _, engine in extra:
        await engine.wait_for_requests(3)  # every new node took traffic
    assert len(cluster.flow.prefill_pool.members) == 3 and len(cluster.flow.decode_pool.members) == 2
    for role, url, _ in extra:
        await admin(http, cluster, "DELETE", params={"role": role, "url": url})
    await cluster.wait_for(lambda: len(cluster.app[MEMBERSHIP].members()) == 2, 10)
    stop.set()
    await generator
    assert set(results) == {"ok"}, results  # zero failed requests through the whole change
    served = [len(engine.requests) for _, _, engine in extra]
    assert await load(http, cluster, 8, 4) == Counter({"ok": 8})
    assert [len(engine.requests) for _, _, engine in extra] == served  # gone means gone


# -- persistence -----------------------------------------------------------------------------------

async def test_state_file_round_trip(cluster_factory: ClusterFactory, http: aiohttp.ClientSession,
                                     tmp_path: Path) -> None:
    state_file = tmp_path / "upstreams.json"
    cluster = await cluster_factory(state_file=str(state_file), health_interval=0)
    assert len(json.loads(state_file.read_text())["upstreams"]) == 3  # written at start
    engine, runner, url = await start_mock(MockConfig(role="decode"))
    cluster.engine_runners[id(engine)] = runner
    await admin(http, cluster, "POST", body={"role": "decode", "url": url, "weight": 3})
    removed = cluster.prefill_urls[0]
    await admin(http, cluster, "DELETE", params={"role": "prefill", "url": removed})
    await admin(http, cluster, "PATCH", f"/{cluster.upstream(cluster.prefill_urls[1]).id}", body={"drain": True})
    assert os.listdir(tmp_path) == ["upstreams.json"]  # written atomically: no temporary file left
    # A restart, with the original server lists still on the command line: the file wins.
    restored = build_app(Settings(prefill_servers=",".join(cluster.prefill_urls),
                                  decode_servers=cluster.decode_urls[0], state_file=state_file))
    members = {(u.role, u.url): u for u in restored[MEMBERSHIP].members()}
    assert (Role.PREFILL, removed) not in members
    assert members[(Role.DECODE, url)].weight == 3
    assert members[(Role.PREFILL, cluster.prefill_urls[1])].state is State.DRAINING


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1}', b'{"version": 2, "upstreams": []}',
                                     b'{"version": 1, "upstreams": [{"role": "x", "url": "h:1"}]}',
                                     b'{"version": 1, "upstreams": [{"role": "prefill", "url": "h:1", "weight": 0}]}'])
def test_corrupt_state_file_is_reported_never_dropped(tmp_path: Path, content: bytes) -> None:
    state_file = tmp_path / "upstreams.json"
    state_file.write_bytes(content)
    with pytest.raises(StateFileError, match="corrupt"):
        build_app(Settings(prefill_servers="h:1", decode_servers="h:2", state_file=state_file))
    assert state_file.read_bytes() == content  # left for the operator to inspect


async def test_corrupt_state_file_stops_the_cli_with_exit_2(tmp_path: Path) -> None:
    state_file = tmp_path / "upstreams.json"
    state_file.write_bytes(b"garbage")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdproxy", "--prefill-servers", "h:1", "--decode-servers", "h:2",
        "--state-file", str(state_file), env={**os.environ, "PYTHONPATH": SRC},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    assert process.returncode == 2
    assert output.decode().startswith("pdproxy: state file") and "corrupt" in output.decode()


# -- the CLI client ----------------------------------------------------------------------------------

async def cli(cluster: Cluster, *args: str, token: str | None = None) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("PDPROXY_ADMIN_TOKEN", None)
    extra = ["--token", token] if token else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdproxy", "upstreams", "--admin-url", cluster.url, *extra, *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_cli_client_against_a_live_proxy(cluster_factory: ClusterFactory) -> None:
    cluster = await cluster_factory(admin_token="t0k", health_interval=0)
    engine, runner, url = await start_mock(MockConfig(role="prefill"))
    cluster.engine_runners[id(engine)] = runner
    code, out = await cli(cluster, "list", token="t0k")
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:4] == ["ID", "ROLE", "URL", "STATE"] and len(rows) == 3
    code, out = await cli(cluster, "add", "prefill", url, "--weight", "2", token="t0k")
    assert code == 0 and out.startswith(f"added prefill {url}"), out
    code, out = await cli(cluster, "drain", "prefill", url, token="t0k")
    assert code == 0 and out.strip().endswith("is now draining")
    code, out = await cli(cluster, "undrain", "prefill", url, token="t0k")
    assert code == 0 and out.strip().endswith("is now unknown")
    code, out = await cli(cluster, "remove", cluster.upstream(url).id, token="t0k")
    assert code == 0 and out.strip() == f"removed prefill {url}"
    code, out = await cli(cluster, "list")  # no token
    assert code == 2 and "401" in out and "Bearer" in out
    code, out = await cli(cluster, "remove", "decode", "nowhere:1", token="t0k")
    assert code == 2 and "no upstream decode nowhere:1" in out
    assert orjson.loads(b"{}") == {}
