"""/livez: liveness that never depends on the engines (readiness, /health, does)."""

from __future__ import annotations

import aiohttp

from pdproxy.livez import liveness
from tests.conftest import ClusterFactory, closed_port_url


async def test_livez_answers_while_every_engine_is_down_and_while_draining(
        cluster_factory: ClusterFactory, http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(0, 0, extra_prefill=(closed_port_url(),), extra_decode=(closed_port_url(),),
                                    health_interval=0.05, health_timeout=0.2, health_fall=1)
    await cluster.wait_for(lambda: not any(u.routable for u in cluster.upstreams()))
    async with http.get(cluster.url + "/health") as resp:
        assert resp.status == 503  # not ready: no engine
    async with http.get(cluster.url + "/livez") as resp:
        assert resp.status == 200  # but alive: no restart would help
        assert await resp.json() == {"status": "alive", "draining": False}
        assert resp.headers["Cache-Control"] == "no-store"
    cluster.flow.start_drain()
    async with http.get(cluster.url + "/livez") as resp:
        assert resp.status == 200  # a draining proxy must not be restarted mid-stream
        assert (await resp.json())["draining"] is True


def test_liveness_is_always_200() -> None:
    assert liveness(False) == (200, {"status": "alive", "draining": False})
    assert liveness(True)[0] == 200
