"""Admin input limits over real HTTP: host names (probe F10), the membership cap (F10), a non-UTF-8
Authorization (F5), forwarding headers on the tokenless admin (F11), and an upstream that is the
proxy's own listener (F9)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from pdproxy.admin import AdminApi
from pdproxy.app import MEMBERSHIP, admin_router, start_server
from pdproxy.health import StateBoard
from pdproxy.membership import MAX_UPSTREAMS, Membership
from pdproxy.upstreams import Role, Upstream, UpstreamPool
from tests.conftest import Cluster, ClusterFactory
from tests.functional.test_admin import admin


async def raw_request(url: str, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes (headers aiohttp's client would refuse to write); the status and the body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(("url", "contains"), [
    ("http://a b:9", "IP address or a DNS name"),
    ("http://%00:9", "IP address or a DNS name"),
    ("http://" + "a" * 10_000 + ":9", "at most 253 characters"),
    ("http://" + "a" * 64 + ".example:9", "at most 63 characters"),
    ("http://999.1.1.1:9", "not a valid IPv4 address"),
])
async def test_a_bad_host_name_is_a_400_and_adds_nothing(cluster: Cluster, http: aiohttp.ClientSession,
                                                         url: str, contains: str) -> None:
    status, answer = await admin(http, cluster, "POST", body={"role": "prefill", "url": url})
    assert status == 400, answer
    assert contains in answer["error"]["message"]
    assert len(cluster.app[MEMBERSHIP].members()) == 3


async def test_a_pool_takes_at_most_max_upstreams(cluster_factory: ClusterFactory,
                                                  http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(health_interval=0)  # no probes of 1,024 made-up addresses
    membership = cluster.app[MEMBERSHIP]
    assert membership.max_per_role == MAX_UPSTREAMS == 1024
    urls = [f"http://10.9.{i // 250}.{i % 250 + 1}:8100" for i in range(MAX_UPSTREAMS - 2)]  # 2 P exist
    for start in range(0, len(urls), 256):
        batch = [{"role": "prefill", "url": url} for url in urls[start:start + 256]]
        status, answer = await admin(http, cluster, "POST", body=batch)
        assert status == 201, answer
    assert len(cluster.flow.prefill_pool.members) == 1024
    status, answer = await admin(http, cluster, "POST", body={"role": "prefill", "url": "http://10.8.0.1:8100"})
    assert status == 409
    assert answer["error"]["message"] == ("the prefill pool may hold 1024 upstreams (--max-upstreams) and has 1024: "
                                          "1 more do not fit; nothing was added")
    # Re-adding one that exists still works (it changes a weight), and the decode pool has its own room.
    status, _ = await admin(http, cluster, "POST", body={"role": "prefill", "url": urls[0], "weight": 2})
    assert status == 200
    status, _ = await admin(http, cluster, "POST", body={"role": "decode", "url": "http://10.8.0.2:8200"})
    assert status == 201
    assert len(cluster.flow.prefill_pool.members) == 1024


async def test_a_bulk_add_that_does_not_fit_adds_none_of_it(cluster_factory: ClusterFactory,
                                                            http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(max_upstreams=4)
    batch = [{"role": "prefill", "url": f"http://10.9.0.{i}:8100"} for i in range(1, 4)]
    status, answer = await admin(http, cluster, "POST", body=batch)
    assert status == 409
    assert "3 more do not fit" in answer["error"]["message"]
    assert len(cluster.flow.prefill_pool.members) == 2
    status, _ = await admin(http, cluster, "POST", body=batch[:2] + batch[:2])  # the same two twice: 2 new
    assert status == 201
    assert len(cluster.flow.prefill_pool.members) == 4


@pytest.mark.parametrize("value", [b"Bearer \xff", b"Bearer \xc3\x28", b"\xff\xfe", b"Bearer s3cret\x80"])
async def test_a_non_utf8_authorization_is_a_401(cluster_factory: ClusterFactory, value: bytes) -> None:
    cluster = await cluster_factory(admin_token="s3cret")
    status, body = await raw_request(cluster.url, b"GET /admin/upstreams HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                     + value + b"\r\nConnection: close\r\n\r\n")
    assert status == 401
    assert b"authentication_error" in body


@pytest.mark.parametrize("header", ["Via", "X-Client-IP", "True-Client-IP", "CF-Connecting-IP",
                                    "X-Envoy-External-Address", "X-Original-Forwarded-For", "X-ProxyUser-Ip",
                                    "X-Forwarded-Host", "Fastly-Client-IP", "X-Cluster-Client-IP"])
async def test_the_tokenless_admin_refuses_every_forwarding_header(cluster: Cluster, http: aiohttp.ClientSession,
                                                                    header: str) -> None:
    status, body = await admin(http, cluster, "GET", headers={header: "1.1 edge"})
    assert status == 403
    assert "loopback" in body["error"]["message"]


@pytest.fixture
async def own_admin() -> AsyncIterator[tuple[str, Membership]]:
    """An admin listener told its own listen addresses, as build_app would tell it (lead: wiring)."""
    pools = {role: UpstreamPool(role, [Upstream(role, f"http://10.0.0.1:{8100 + i}")])
             for i, role in enumerate(Role)}
    membership = Membership(pools, StateBoard(), warmup=False)
    addresses: list[tuple[str, int]] = []
    api = AdminApi(membership, token=None, default_caps={Role.PREFILL: 0, Role.DECODE: 0},
                   listen_addresses=lambda: addresses, local_hosts=["gpu-node-7"])
    runner, url = await start_server(admin_router(api), "127.0.0.1", 0)
    addresses += [("0.0.0.0", 18000), ("127.0.0.1", int(url.rsplit(":", 1)[1]))]
    yield url, membership
    await runner.cleanup()


@pytest.mark.parametrize("upstream", ["127.0.0.1:18000", "localhost:18000", "http://[::1]:18000",
                                      "gpu-node-7:18000", "OWN_ADMIN"])
async def test_an_upstream_that_is_the_proxy_itself_is_refused(own_admin: tuple[str, Membership],
                                                               http: aiohttp.ClientSession, upstream: str) -> None:
    url, membership = own_admin
    if upstream == "OWN_ADMIN":
        upstream = url
    body: Any = {"role": "prefill", "url": upstream, "skip_warmup": True}
    async with http.post(url + "/admin/upstreams", json=body) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert "is this proxy's own listener: requests would loop back into it" in answer["error"]["message"]
    assert answer["error"]["param"] == "url"
    assert len(membership.members()) == 2


async def test_another_port_of_this_machine_is_fine(own_admin: tuple[str, Membership],
                                                    http: aiohttp.ClientSession) -> None:
    url, membership = own_admin
    async with http.post(url + "/admin/upstreams", json={"role": "prefill", "url": "127.0.0.1:18001"}) as resp:
        assert resp.status == 201
    assert len(membership.members()) == 3
