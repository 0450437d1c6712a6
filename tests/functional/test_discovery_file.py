"""`file` discovery end to end: a real proxy, real mock engines, a file rewritten during the test."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pdproxy.discovery.base import Target
from pdproxy.discovery.file import parse_upstreams_file
from pdproxy.mock import MockConfig, MockEngine, start_mock
from pdproxy.upstreams import Role, State
from tests.conftest import Cluster, ClusterFactory
from tests.functional.test_resilience import FAST_HEALTH, STREAM, load, send

FAST_FILE = {"discovery": "file", "discovery_interval": 0.02, "discovery_removal_delay": 0, **FAST_HEALTH}


def write_atomically(path: Path, data: Any, *, raw: str | None = None) -> None:
    """What a job script should do: write a temporary file, then rename it over the old one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(raw if raw is not None else yaml.safe_dump(data), encoding="utf-8")
    os.replace(temporary, path)


async def decode_engine(cluster: Cluster, config: MockConfig | None = None) -> tuple[MockEngine, str]:
    """One more decode engine, stopped with the cluster."""
    engine, runner, url = await start_mock(config or MockConfig(role="decode"))
    cluster.engine_runners[id(engine)] = runner
    return engine, url


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """For conditions no event announces (a metric): re-check every 10 ms, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


def members(cluster: Cluster, role: Role = Role.DECODE) -> list[str]:
    pool = cluster.flow.decode_pool if role is Role.DECODE else cluster.flow.prefill_pool
    return [u.url for u in pool.members]


@pytest.fixture
def upstreams_file(tmp_path: Path) -> Path:
    return tmp_path / "upstreams.yaml"


async def test_upstreams_come_and_go_with_the_file(cluster_factory: ClusterFactory, upstreams_file: Path,
                                                  http: aiohttp.ClientSession) -> None:
    write_atomically(upstreams_file, {"decode": []})
    cluster = await cluster_factory(2, 0, discovery_file=upstreams_file, **FAST_FILE)  # no decode configured
    assert members(cluster) == []
    assert await send(http, cluster) == "status 503"  # nothing to decode on yet

    d1, d1_url = await decode_engine(cluster)
    write_atomically(upstreams_file, {"decode": [d1_url]})
    await cluster.wait_for(lambda: members(cluster) == [d1_url])
    assert cluster.upstream(d1_url).state is State.WARMING  # no traffic before its probes pass
    assert cluster.upstream(d1_url).source == "file"
    await cluster.wait_state(d1_url, State.HEALTHY)
    assert await send(http, cluster) == "ok"

    d2, d2_url = await decode_engine(cluster)
    write_atomically(upstreams_file, {"decode": [d1_url, {"url": d2_url, "weight": 2}]})
    await cluster.wait_for(lambda: d2_url in members(cluster))
    await cluster.wait_state(d2_url, State.HEALTHY)
    assert cluster.upstream(d2_url).weight == 2
    results = await load(http, cluster, 12, 4)
    assert results == {"ok": 12}
    assert d1.requests and d2.requests

    write_atomically(upstreams_file, {"decode": [d2_url]})
    await cluster.wait_for(lambda: members(cluster) == [d2_url])
    before = len(d1.requests)
    assert await load(http, cluster, 4, 2) == {"ok": 4}
    assert len(d1.requests) == before  # gone means no traffic
    assert cluster.metric("pdproxy_discovery_changes_total", source="file", action="remove") == 1


async def test_a_bad_file_keeps_the_old_list(cluster_factory: ClusterFactory, upstreams_file: Path,
                                            http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    cluster = await cluster_factory(1, 1, **FAST_FILE, discovery_file=upstreams_file)
    _, d_url = await decode_engine(cluster)
    write_atomically(upstreams_file, {"decode": [d_url]})
    await cluster.wait_for(lambda: d_url in members(cluster))
    errors = 0.0

    for bad in ("decode: [unclosed\n", "decode:\n  - ftp://h:1\n", "decode: [a:1, a:1]\n",
                "decode: []\nextra: 1\n", "- just\n- a list\n"):
        write_atomically(upstreams_file, None, raw=bad)
        await until(lambda seen=errors: cluster.metric("pdproxy_discovery_errors_total", source="file") > seen)
        errors = cluster.metric("pdproxy_discovery_errors_total", source="file")
        assert d_url in members(cluster), bad  # the old list stays
    assert errors == 5
    assert "keeping the last list" in caplog.text and "upstreams.yaml" in caplog.text

    os.remove(upstreams_file)  # a missing file is an error too, and changes nothing
    await until(lambda: cluster.metric("pdproxy_discovery_errors_total", source="file") == 6)
    assert d_url in members(cluster)

    write_atomically(upstreams_file, {"decode": []})  # a good file again is applied
    await cluster.wait_for(lambda: d_url not in members(cluster))
    assert await send(http, cluster) == "ok"  # the configured decode server is not the file's: it stays


async def test_removal_drains_open_streams_first(cluster_factory: ClusterFactory, upstreams_file: Path,
                                                http: aiohttp.ClientSession) -> None:
    slow = MockConfig(role="decode", itl_ms=20)
    cluster = await cluster_factory(1, 0, **FAST_FILE, discovery_file=upstreams_file)
    engine, url = await decode_engine(cluster, slow)
    write_atomically(upstreams_file, {"decode": [url]})
    await cluster.wait_for(lambda: url in members(cluster))
    await cluster.wait_state(url, State.HEALTHY)

    body = {**STREAM, "max_tokens": 30}
    async with http.post(cluster.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        await resp.content.readline()  # the stream runs on the engine
        write_atomically(upstreams_file, {"decode": []})
        await cluster.wait_state(url, State.DRAINING)
        assert url in members(cluster)  # still listed while its stream runs
        assert await send(http, cluster) == "status 503"  # but takes no new request
        rest = await resp.read()
    assert b"[DONE]" in rest  # the open stream ended normally
    await cluster.wait_for(lambda: url not in members(cluster))
    assert len(engine.requests) == 1


async def test_a_ready_false_entry_is_listed_but_drained(cluster_factory: ClusterFactory, upstreams_file: Path,
                                                        http: aiohttp.ClientSession) -> None:
    cluster = await cluster_factory(1, 1, **FAST_FILE, discovery_file=upstreams_file)
    _, url = await decode_engine(cluster)
    write_atomically(upstreams_file, {"decode": [url]})
    await cluster.wait_for(lambda: url in members(cluster))
    await cluster.wait_state(url, State.HEALTHY)
    write_atomically(upstreams_file, {"decode": [{"url": url, "ready": False}]})
    await cluster.wait_state(url, State.DRAINING)
    write_atomically(upstreams_file, {"decode": [{"url": url}]})
    await cluster.wait_state(url, State.UNKNOWN, State.HEALTHY)
    assert await load(http, cluster, 6, 3) == {"ok": 6}


def test_parse_forms(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    desired = parse_upstreams_file(path, b'{"prefill": ["h:1=3", {"url": "https://h:2"}], "decode": null}')
    assert desired == {Role.PREFILL: (Target("http://h:1", 3), Target("https://h:2")), Role.DECODE: ()}
    assert parse_upstreams_file(tmp_path / "empty.yaml", b"") == {Role.PREFILL: (), Role.DECODE: ()}


@pytest.mark.parametrize(("raw", "expected"), [
    (b"prefill: [h:0]", "prefill.0.url: upstream 'h:0': port must be 1-65535"),
    (b"prefill: [{url: 'h:1', weight: 0}]", "prefill.0.weight"),
    (b"decode: h:1", "decode"),
    (b"\xff\xfe", "does not parse"),
    (b"colour: red", "colour"),
])
def test_parse_errors_are_one_line(tmp_path: Path, raw: bytes, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_upstreams_file(tmp_path / "u.yaml", raw)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
