"""`dns` discovery against a real DNS server: dnsmasq on a loopback port, its records changed during the test.

dnsmasq (Debian's dnsmasq-base; .ci/run installs it) serves a hosts file this test rewrites, re-read on
SIGHUP, and SRV records given on its command line. A headless Kubernetes Service behaves the same way:
a pod that is not ready is simply no longer in the answer.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import pytest
from aiohttp import web

from pdproxy.discovery.base import SourceFailure, Target
from pdproxy.discovery.dns import DnsName, DnsSource, parse_names, parse_nameserver
from pdproxy.mock import MockConfig, MockEngine, start_mock
from pdproxy.upstreams import Role, State
from tests.conftest import Cluster, ClusterFactory, needs_tool
from tests.functional.test_resilience import FAST_HEALTH, load

DNSMASQ = shutil.which("dnsmasq") or next((p for p in ("/usr/sbin/dnsmasq",) if os.access(p, os.X_OK)), None)
pytestmark = needs_tool(DNSMASQ, "dnsmasq: apt-get install dnsmasq-base; .ci/run installs it")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


@dataclass
class Dnsmasq:
    process: subprocess.Popen[bytes]
    port: int
    hosts: Path

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_hosts(self, *lines: str) -> None:
        """Rewrite the hosts file and make dnsmasq re-read it (SIGHUP; it also clears its cache)."""
        self.hosts.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        self.process.send_signal(signal.SIGHUP)


def start_dnsmasq(tmp_path: Path, *extra: str) -> Dnsmasq:
    assert DNSMASQ is not None, "dnsmasq is not installed (.ci/run installs dnsmasq-base)"
    hosts = tmp_path / "hosts"
    hosts.write_text("", encoding="utf-8")
    port = free_port()
    user = ["--user=" + pwd.getpwuid(os.geteuid()).pw_name] if os.geteuid() == 0 else []  # keep read access
    process = subprocess.Popen(
        [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}", "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--local=/test/",
         "--pid-file=", "--log-facility=-", *user, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Dnsmasq(process, port, hosts)


async def wait_until_answering(server: Dnsmasq) -> None:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], server.port, 0.2
    for _ in range(50):
        if server.process.poll() is not None:
            stderr = server.process.stderr.read().decode() if server.process.stderr else ""
            raise RuntimeError(f"dnsmasq exited: {stderr}")
        try:
            await resolver.resolve("probe.test", "A", search=False)
            return
        except dns.resolver.NXDOMAIN:
            return  # it answers
        except dns.exception.DNSException:
            await asyncio.sleep(0.05)
    raise RuntimeError("dnsmasq did not answer within 2.5 s")


@pytest.fixture
def dns_servers(tmp_path: Path) -> Iterator[list[Dnsmasq]]:
    started: list[Dnsmasq] = []
    yield started
    for server in started:
        server.process.terminate()
        server.process.wait(5)
        if server.process.stderr:
            server.process.stderr.close()


async def dnsmasq(dns_servers: list[Dnsmasq], tmp_path: Path, *extra: str) -> Dnsmasq:
    directory = tmp_path / f"dns{len(dns_servers)}"
    directory.mkdir()
    server = start_dnsmasq(directory, *extra)
    dns_servers.append(server)
    await wait_until_answering(server)
    return server


EngineStarter = Callable[..., Awaitable[tuple[MockEngine, int]]]


@pytest.fixture
async def engine_on() -> AsyncIterator[EngineStarter]:
    """Start mock engines before the proxy (their ports go into the DNS records); stop them after."""
    runners: list[web.AppRunner] = []

    async def start(role: str, host: str = "127.0.0.1", port: int = 0) -> tuple[MockEngine, int]:
        engine, runner, url = await start_mock(MockConfig(role=role), host=host, port=port)
        runners.append(runner)
        return engine, int(url.rsplit(":", 1)[1])

    yield start
    for runner in runners:
        await runner.cleanup()


def decode_urls(cluster: Cluster) -> list[str]:
    return sorted(u.url for u in cluster.flow.decode_pool.members)


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def decode_by_dns(cluster_factory: ClusterFactory, server: Dnsmasq, port: int, **settings: Any) -> Cluster:
    """A proxy with one configured P whose decode servers are `decode.test:<port>` on `server`."""
    return await cluster_factory(1, 0, discovery="dns", discovery_dns_decode=f"decode.test:{port}",
                                 discovery_dns_nameserver=server.nameserver, discovery_interval=0.05, **settings)


async def test_a_and_aaaa_records_added_removed_and_gone(cluster_factory: ClusterFactory, tmp_path: Path,
                                                        dns_servers: list[Dnsmasq], engine_on: EngineStarter,
                                                        http_session: aiohttp.ClientSession) -> None:
    server = await dnsmasq(dns_servers, tmp_path)
    server.set_hosts("127.0.0.1 decode.test")
    v4, port = await engine_on("decode")
    v6, _ = await engine_on("decode", host="::1", port=port)  # same port, the other address family
    cluster = await decode_by_dns(cluster_factory, server, port, discovery_removal_delay=0, **FAST_HEALTH)
    v4_url, v6_url = f"http://127.0.0.1:{port}", f"http://[::1]:{port}"

    await cluster.wait_for(lambda: decode_urls(cluster) == [v4_url])  # found
    assert cluster.upstream(v4_url).source == "dns"
    await cluster.wait_state(v4_url, State.HEALTHY)

    server.set_hosts("127.0.0.1 decode.test", "::1 decode.test")  # added: an AAAA record
    await cluster.wait_for(lambda: decode_urls(cluster) == [v4_url, v6_url])
    await cluster.wait_state(v6_url, State.HEALTHY)
    assert await load(http_session, cluster, 10, 4) == {"ok": 10}
    assert v4.requests and v6.requests

    served = len(v4.requests)
    server.set_hosts("::1 decode.test")  # removed (as a headless Service drops a pod that is not ready)
    await cluster.wait_for(lambda: decode_urls(cluster) == [v6_url])
    assert await load(http_session, cluster, 4, 2) == {"ok": 4}
    assert len(v4.requests) == served

    server.set_hosts()  # the name is gone (NXDOMAIN): no decode upstream left
    await cluster.wait_for(lambda: decode_urls(cluster) == [])
    assert cluster.metric("pdproxy_discovery_errors_total", source="dns") == 0  # NXDOMAIN is an answer


async def resolves(server: Dnsmasq, name: str) -> bool:
    """Whether dnsmasq has an A record for `name` now (it re-reads its hosts file after SIGHUP)."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime, resolver.cache = ["127.0.0.1"], server.port, 0.5, None
    try:
        await resolver.resolve(name, "A", search=False)
    except dns.resolver.NXDOMAIN:
        return False
    return True


async def looked_after(cluster: Cluster, server: Dnsmasq, name: str, present: bool) -> None:
    """Until dnsmasq answers the change and the source has looked twice since (bounded)."""
    deadline = asyncio.get_running_loop().time() + 3
    while await resolves(server, name) != present:
        assert asyncio.get_running_loop().time() < deadline, "dnsmasq never took the change"
        await asyncio.sleep(0.02)
    looks = cluster.metric("pdproxy_discovery_updates_total", source="dns")
    while cluster.metric("pdproxy_discovery_updates_total", source="dns") < looks + 2:
        assert asyncio.get_running_loop().time() < deadline, "the dns source stopped looking"
        await asyncio.sleep(0.02)


async def test_a_flapping_record_is_damped(cluster_factory: ClusterFactory, tmp_path: Path,
                                          dns_servers: list[Dnsmasq], engine_on: EngineStarter,
                                          http_session: aiohttp.ClientSession) -> None:
    """A record gone for less than the removal delay, then back: the upstream never left, never drained."""
    server = await dnsmasq(dns_servers, tmp_path)
    server.set_hosts("127.0.0.1 decode.test")
    engine, port = await engine_on("decode")
    cluster = await decode_by_dns(cluster_factory, server, port, discovery_removal_delay=30, **FAST_HEALTH)
    url = f"http://127.0.0.1:{port}"
    await cluster.wait_for(lambda: decode_urls(cluster) == [url])
    await cluster.wait_state(url, State.HEALTHY)

    server.set_hosts()  # gone from DNS (a headless Service's pod not ready for a moment)
    await looked_after(cluster, server, "decode.test", present=False)
    assert decode_urls(cluster) == [url] and cluster.upstream(url).state is State.HEALTHY
    served = len(engine.requests)
    assert await load(http_session, cluster, 4, 2) == {"ok": 4}  # still serving meanwhile
    assert len(engine.requests) > served

    server.set_hosts("127.0.0.1 decode.test")  # back within the delay
    await looked_after(cluster, server, "decode.test", present=True)
    assert decode_urls(cluster) == [url] and cluster.upstream(url).state is State.HEALTHY
    for action in ("add", "drain", "remove"):
        expected = 1 if action == "add" else 0
        assert cluster.metric("pdproxy_discovery_changes_total", source="dns", action=action) == expected, action


async def test_srv_records_give_ports_and_weights(cluster_factory: ClusterFactory, tmp_path: Path,
                                                 dns_servers: list[Dnsmasq], engine_on: EngineStarter) -> None:
    (_, p1), (_, p2), (_, p3) = [await engine_on("prefill") for _ in range(3)]
    server = await dnsmasq(dns_servers, tmp_path,
                           f"--srv-host=_http._tcp.prefill.test,p1.test,{p1},0,1",
                           f"--srv-host=_http._tcp.prefill.test,p2.test,{p2},0,2",
                           f"--srv-host=_http._tcp.prefill.test,p3.test,{p3},1,5")  # priority 1: a backup
    server.set_hosts("127.0.0.1 p1.test", "127.0.0.1 p2.test", "127.0.0.1 p3.test")
    cluster = await cluster_factory(
        0, 1, discovery="dns", discovery_dns_prefill="_http._tcp.prefill.test",
        discovery_dns_nameserver=server.nameserver, discovery_interval=0.05, discovery_removal_delay=0,
        health_interval=0)

    def prefill() -> dict[str, int]:
        return {u.url: u.weight for u in cluster.flow.prefill_pool.members}

    await cluster.wait_for(lambda: prefill() == {f"http://127.0.0.1:{p1}": 1, f"http://127.0.0.1:{p2}": 2})
    server.set_hosts("127.0.0.1 p1.test", "127.0.0.1 p3.test")  # p2's target lost its address
    await cluster.wait_for(lambda: prefill() == {f"http://127.0.0.1:{p1}": 1})


async def test_a_silent_server_is_a_failure_and_keeps_the_list() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # receives queries, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        source = DnsSource({Role.DECODE: parse_names("decode.test:8200")}, interval=0.05, timeout=0.2,
                           nameserver=f"127.0.0.1:{port}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await source.resolve_all()
        assert loop.time() - started < 1.0  # bounded by the timeout
    assert isinstance(result, SourceFailure)
    assert "0.2" in result.reason


async def test_a_timeout_through_the_proxy_is_counted_and_changes_nothing(
        cluster_factory: ClusterFactory, tmp_path: Path, dns_servers: list[Dnsmasq],
        engine_on: EngineStarter) -> None:
    server = await dnsmasq(dns_servers, tmp_path)
    _, port = await engine_on("decode")
    server.set_hosts("127.0.0.1 decode.test")
    cluster = await decode_by_dns(cluster_factory, server, port, discovery_dns_timeout=0.2, discovery_removal_delay=0,
                                  health_interval=0)
    url = f"http://127.0.0.1:{port}"
    await cluster.wait_for(lambda: decode_urls(cluster) == [url])
    server.process.send_signal(signal.SIGSTOP)  # the server hangs: queries time out
    try:
        deadline = asyncio.get_running_loop().time() + 3
        while cluster.metric("pdproxy_discovery_errors_total", source="dns") < 2:
            assert asyncio.get_running_loop().time() < deadline, "no DNS error counted"
            await asyncio.sleep(0.02)
        assert decode_urls(cluster) == [url]
        assert cluster.upstream(url).state is not State.DRAINING
    finally:
        server.process.send_signal(signal.SIGCONT)


def test_name_forms() -> None:
    assert parse_names(" a.test:80 ,_http._tcp.b.test,[::1]:81") == (
        DnsName("a.test", 80), DnsName("_http._tcp.b.test", None), DnsName("::1", 81))
    for bad in ("a.test", "a.test:0", "a.test:http", ":80"):
        with pytest.raises(ValueError, match="name:port"):
            DnsName.parse(bad)
    assert parse_nameserver("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_nameserver("10.0.0.2:5353") == ("10.0.0.2", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    assert Target("http://h:1") == Target("http://h:1", 1, True)
