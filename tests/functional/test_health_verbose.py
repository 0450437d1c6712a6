"""`/health?verbose=1` lists the topology (every upstream URL, state, last error): it is behind the admin API's
rule (probe finding F16). Plain `/health` stays open to every prober."""

from __future__ import annotations

from typing import Any

import aiohttp

from pdproxy.http.request import Headers, Request
from tests.conftest import Cluster, ClusterFactory


async def health(http: aiohttp.ClientSession, cluster: Cluster, query: str = "", **headers: str) -> tuple[int, Any]:
    async with http.get(cluster.url + "/health" + query, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def assert_error(body: Any, status: int, error_type: str) -> None:
    assert set(body) == {"error"}, body  # not one upstream field leaks next to the error
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type, (status, body)


async def test_without_a_token_verbose_is_for_direct_loopback_clients(cluster: Cluster,
                                                                      http: aiohttp.ClientSession) -> None:
    status, body = await health(http, cluster, "?verbose=1")
    assert status == 200
    assert sorted(u["url"] for u in body["upstreams"]) == sorted(cluster.prefill_urls + cluster.decode_urls)
    for header in ("X-Forwarded-For", "Via", "CF-Connecting-IP"):  # came through another proxy: not local
        status, body = await health(http, cluster, "?verbose=1", **{header: "203.0.113.7"})
        assert status == 403
        assert_error(body, status, "permission_error")
    status, body = await health(http, cluster, **{"X-Forwarded-For": "203.0.113.7"})
    assert status == 200 and "upstreams" not in body  # plain /health: open, no topology


async def test_without_a_token_a_remote_client_gets_403_for_verbose_only(cluster: Cluster) -> None:
    """The listener is loopback-only in tests, so the remote address is set on a request handed to the route."""
    handler = cluster.app.router.resolve(_request("/health", "verbose=1", "192.0.2.10"))
    response = await handler(_request("/health", "verbose=1", "192.0.2.10"))
    assert response.status == 403 and b"upstreams" not in response.body
    plain = await handler(_request("/health", "", "192.0.2.10"))
    assert plain.status == 200 and b"upstreams" not in plain.body
    local = await handler(_request("/health", "verbose=true", "127.0.0.1"))
    assert local.status == 200 and b"upstreams" in local.body


async def test_with_a_token_verbose_needs_it_even_from_loopback(cluster_factory: ClusterFactory,
                                                                http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(admin_token="s3cret")
    status, body = await health(http, cluster, "?verbose=1")
    assert status == 401
    assert_error(body, status, "authentication_error")
    status, body = await health(http, cluster, "?verbose=1", Authorization="Bearer wrong")
    assert status == 401
    status, body = await health(http, cluster, "?verbose=1", Authorization="Bearer s3cret")
    assert status == 200 and len(body["upstreams"]) == 3 and body["in_flight"] == 0
    status, body = await health(http, cluster, "?verbose=1", Authorization="Bearer s3cret",
                                **{"X-Forwarded-For": "203.0.113.7"})
    assert status == 200  # the token is the whole rule when one is set, as for the admin API
    for query in ("", "?verbose=0", "?verbose=false"):
        status, body = await health(http, cluster, query)
        assert status == 200 and body["status"] == "ok" and "upstreams" not in body


def _request(path: str, query: str, remote: str) -> Request:
    return Request(None, "GET", path, query, "1.1", True, Headers([("Host", "x")]), remote)
