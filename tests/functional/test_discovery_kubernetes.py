"""`kubernetes` discovery against recorded API responses replayed by a local aiohttp server.

No API server can run here, so tests/functional/recordings/kubernetes/ holds an EndpointSliceList, a watch
stream (newline-delimited watch events: MODIFIED, BOOKMARK, ADDED, DELETED), a 410 Expired error event and
a 403 Status, written after the Kubernetes API reference (discovery.k8s.io/v1). The replay server answers
the list and streams the watch events one at a time, when the test releases them, so each step's effect on
the pools is checked on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pdproxy.discovery.kubernetes import KubernetesError, slice_targets
from pdproxy.upstreams import State
from tests.conftest import Cluster, ClusterFactory

RECORDINGS = Path(__file__).parent / "recordings" / "kubernetes"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices"
SELECTOR = "kubernetes.io/service-name=vllm-prefill"
A, B, C, D = (f"http://{ip}:8000" for ip in ("10.244.1.17", "10.244.2.9", "10.244.1.23", "10.244.3.4"))


def recording(name: str) -> Any:
    return json.loads((RECORDINGS / name).read_text(encoding="utf-8"))


def watch_lines(name: str) -> list[bytes]:
    return [line.encode() + b"\n" for line in (RECORDINGS / name).read_text(encoding="utf-8").splitlines()]


@dataclass
class ApiServer:
    """Replays recordings: lists in order, watch events as the test releases them (None ends a watch)."""

    lists: list[tuple[int, Any]] = field(default_factory=list)
    events: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({**request.query, "authorization": request.headers.get("Authorization", "")})
        if request.query.get("watch") != "1":
            status, body = self.lists.pop(0)
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while (line := await self.events.get()) is not None:
            await response.write(line)
        await response.write_eof()
        return response

    def watches(self) -> list[dict[str, str]]:
        return [r for r in self.requests if r.get("watch") == "1"]


@pytest.fixture
async def api_server() -> AsyncIterator[ApiServer]:
    server = ApiServer()
    app = web.Application()
    app.router.add_get(SLICES, server.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    server.events.put_nowait(None)
    await runner.cleanup()


async def k8s_cluster(cluster_factory: ClusterFactory, api: ApiServer, tmp_path: Path, **extra: Any) -> Cluster:
    token = tmp_path / "token"
    token.write_text("recorded-token\n", encoding="utf-8")
    settings = {"discovery": "kubernetes", "discovery_k8s_api_url": api.url, "discovery_k8s_namespace": "llm",
                "discovery_k8s_prefill_selector": SELECTOR, "discovery_k8s_port": "http",
                "discovery_k8s_token_file": token, "discovery_removal_delay": 0, "health_interval": 0, **extra}
    return await cluster_factory(0, 1, **settings)


def prefill(cluster: Cluster) -> dict[str, str]:
    return {u.url: u.state.value for u in cluster.flow.prefill_pool.members}


async def until(check: Any, timeout: float = 3.0) -> None:
    """For what no state change announces (a request reaching the replay server): re-check every 10 ms."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_list_then_watch_follows_readiness_and_slices(cluster_factory: ClusterFactory, api_server: ApiServer,
                                                           tmp_path: Path) -> None:
    api_server.lists.append((200, recording("endpointslices-list.json")))
    cluster = await k8s_cluster(cluster_factory, api_server, tmp_path)
    # The list: A and B are ready; C is starting (not ready) and is not added before it is ready.
    await cluster.wait_for(lambda: prefill(cluster) == {A: "unknown", B: "unknown"})
    assert cluster.upstream(A).source == "kubernetes"
    await until(lambda: len(api_server.watches()) == 1)
    (listed, watch) = api_server.requests
    assert listed["labelSelector"] == SELECTOR and "watch" not in listed
    assert watch["resourceVersion"] == "48213" and watch["allowWatchBookmarks"] == "true"
    assert listed["authorization"] == watch["authorization"] == "Bearer recorded-token"

    modified_c, bookmark, terminating_a, gone_a, added_d, deleted_b = watch_lines("endpointslices-watch.jsonl")
    api_server.events.put_nowait(modified_c)  # C passed its readiness probe
    await cluster.wait_for(lambda: prefill(cluster) == {A: "unknown", B: "unknown", C: "unknown"})
    api_server.events.put_nowait(bookmark)
    api_server.events.put_nowait(terminating_a)  # A is being deleted: ready false, serving and terminating
    await cluster.wait_state(A, State.DRAINING)
    assert A in prefill(cluster)  # drained, not removed: requests on it may finish
    api_server.events.put_nowait(gone_a)
    await cluster.wait_for(lambda: A not in prefill(cluster))
    api_server.events.put_nowait(added_d)
    await cluster.wait_for(lambda: D in prefill(cluster))
    api_server.events.put_nowait(deleted_b)
    await cluster.wait_for(lambda: prefill(cluster) == {C: "unknown", D: "unknown"})

    api_server.events.put_nowait(None)  # the server ends the watch (timeoutSeconds): watch again, no list
    await until(lambda: len(api_server.watches()) == 2)
    assert api_server.watches()[1]["resourceVersion"] == "48377"  # the last version seen
    assert len(api_server.requests) == 3

    api_server.lists.append((200, recording("endpointslices-relist.json")))
    api_server.events.put_nowait(watch_lines("endpointslices-watch-expired.jsonl")[0])  # 410: list again
    # The relist: B is back (in slice 1 now), D is not ready any more.
    await cluster.wait_for(lambda: prefill(cluster) == {C: "unknown", D: "draining", B: "unknown"})
    await until(lambda: len(api_server.watches()) == 3)
    assert api_server.watches()[2]["resourceVersion"] == "49020"
    assert cluster.metric("pdproxy_discovery_errors_total", source="kubernetes") == 0
    assert cluster.metric("pdproxy_discovery_changes_total", source="kubernetes", action="remove") == 2


async def test_a_refused_list_is_an_error_and_is_retried(cluster_factory: ClusterFactory, api_server: ApiServer,
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api_server.lists += [(403, recording("status-forbidden.json")), (200, recording("endpointslices-list.json"))]
    cluster = await k8s_cluster(cluster_factory, api_server, tmp_path)
    await until(lambda: cluster.metric("pdproxy_discovery_errors_total", source="kubernetes") == 1)
    assert prefill(cluster) == {}
    assert "403" in caplog.text and "forbidden" in caplog.text
    await cluster.wait_for(lambda: set(prefill(cluster)) == {A, B}, timeout=5)  # after one backoff second


def test_the_port_is_chosen_by_name_or_number() -> None:
    item = recording("endpointslices-list.json")["items"][0]
    assert [t.url for t in slice_targets(item, "http", "http")] == [A, "http://10.244.1.23:8000"]
    assert [t.url for t in slice_targets(item, "5600", "https")] == ["https://10.244.1.17:5600",
                                                                     "https://10.244.1.23:5600"]
    assert [t.ready for t in slice_targets(item, "http", "http")] == [True, False]
    with pytest.raises(KubernetesError, match="exactly one port"):
        slice_targets(item, "", "http")  # two ports: which one is ambiguous
    with pytest.raises(KubernetesError, match="'grpc'"):
        slice_targets(item, "grpc", "http")


def test_absent_conditions_read_as_ready_and_ipv6_is_bracketed() -> None:
    item = {"metadata": {"name": "s"}, "addressType": "IPv6", "ports": [{"port": 8000}],
            "endpoints": [{"addresses": ["fd00::5"]}, {"addresses": ["fd00::6"], "conditions": {"ready": None}}]}
    targets = slice_targets(item, "", "http")
    assert [(t.url, t.ready) for t in targets] == [("http://[fd00::5]:8000", True), ("http://[fd00::6]:8000", True)]


@pytest.mark.parametrize(("conditions", "routable"), [
    ({"ready": True, "serving": True, "terminating": False}, True),
    ({}, True),  # nil: ready and serving true, terminating false
    ({"ready": False, "serving": False, "terminating": False}, False),  # starting, or failing its probe
    ({"ready": False, "serving": True, "terminating": True}, False),  # terminating, still finishing its streams
    ({"ready": True, "serving": False, "terminating": False}, False),  # publishNotReadyAddresses, pod not Ready
    ({"ready": True, "serving": True, "terminating": True}, False),  # publishNotReadyAddresses, pod deleted
    ({"ready": True, "serving": None, "terminating": None}, True),
])
def test_ready_serving_and_terminating_must_all_agree(conditions: dict[str, Any], routable: bool) -> None:
    item = {"metadata": {"name": "s"}, "ports": [{"port": 8000}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": conditions}]}
    assert [t.ready for t in slice_targets(item, "", "http")] == [routable]


async def test_publish_not_ready_addresses_follows_serving_and_terminating(
        cluster_factory: ClusterFactory, api_server: ApiServer, tmp_path: Path) -> None:
    """With publishNotReadyAddresses the controller says `ready: true` for every pod: serving and
    terminating are what tell a pod failing its probe, or being deleted, from one to route to."""
    api_server.lists.append((200, recording("endpointslices-list.json")))
    cluster = await k8s_cluster(cluster_factory, api_server, tmp_path)
    await cluster.wait_for(lambda: prefill(cluster) == {A: "unknown", B: "unknown"})
    await until(lambda: len(api_server.watches()) == 1)
    not_serving, back_and_terminating = watch_lines("endpointslices-watch-publish-not-ready.jsonl")
    api_server.events.put_nowait(not_serving)  # A: ready true, serving false; C ready and serving: added
    await cluster.wait_for(lambda: prefill(cluster) == {A: "draining", B: "unknown", C: "unknown"})
    api_server.events.put_nowait(back_and_terminating)  # A serving again; C still ready true, but terminating
    await cluster.wait_for(lambda: prefill(cluster) == {A: "unknown", B: "unknown", C: "draining"})
    assert cluster.metric("pdproxy_discovery_changes_total", source="kubernetes", action="drain") == 2
    assert cluster.metric("pdproxy_discovery_changes_total", source="kubernetes", action="undrain") == 1
