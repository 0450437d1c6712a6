"""Discovery settings: what each source needs, which roles it covers, and clear start-up errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdproxy.cli import main
from pdproxy.discovery import make_source
from pdproxy.discovery.base import SourceFailure, Target
from pdproxy.discovery.dns import DnsSource
from pdproxy.discovery.file import FileSource
from pdproxy.discovery.kubernetes import KubernetesSource
from pdproxy.settings import ConfigError, load_settings
from pdproxy.upstreams import Role


@pytest.mark.parametrize(("values", "expected"), [
    ({"discovery": "file"}, "discovery=file needs discovery_file"),
    ({"discovery": "dns"}, "discovery=dns needs discovery_dns_prefill and/or discovery_dns_decode"),
    ({"discovery": "kubernetes"}, "discovery=kubernetes needs discovery_k8s_prefill_selector"),
    ({"discovery": "consul"}, "discovery"),
    ({"discovery": "dns", "discovery_dns_prefill": "p:1"}, "no decode servers"),  # dns covers prefill only
])
def test_what_each_source_needs(values: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(values)


def test_covered_roles_may_start_empty(tmp_path: Path) -> None:
    settings = load_settings({"discovery": "dns", "discovery_dns_prefill": "p.test:8100", "decode_servers": "d:1"})
    assert settings.discovered_roles() == {"prefill"} and settings.prefill_servers == ()
    settings = load_settings({"discovery": "file", "discovery_file": str(tmp_path / "u.yaml")})
    assert settings.discovered_roles() == {"prefill", "decode"}
    assert load_settings({"prefill_servers": "p:1", "decode_servers": "d:1"}).discovered_roles() == frozenset()


def test_make_source_builds_the_configured_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_source(load_settings({"prefill_servers": "p:1", "decode_servers": "d:1"})) is None
    file_source = make_source(load_settings({"discovery": "file", "discovery_file": str(tmp_path / "u.yaml")}))
    assert isinstance(file_source, FileSource) and file_source.interval == 5.0
    dns_source = make_source(load_settings({"discovery": "dns", "discovery_dns_decode": "_http._tcp.d.test",
                                            "discovery_dns_nameserver": "127.0.0.1:5353",
                                            "prefill_servers": "p:1"}))
    assert isinstance(dns_source, DnsSource) and list(dns_source.names) == [Role.DECODE]
    assert (dns_source.resolver.nameservers, dns_source.resolver.port) == (["127.0.0.1"], 5353)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    k8s = make_source(load_settings({"discovery": "kubernetes", "discovery_k8s_decode_selector": "app=d",
                                     "discovery_k8s_namespace": "llm", "prefill_servers": "p:1"}))
    assert isinstance(k8s, KubernetesSource)
    assert k8s.api_url == "https://10.96.0.1:443"
    assert k8s.path == "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices"
    assert k8s.selectors == {Role.DECODE: "app=d"}


def test_kubernetes_outside_a_cluster_needs_an_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = load_settings({"discovery": "kubernetes", "discovery_k8s_decode_selector": "app=d",
                              "prefill_servers": "p:1"})
    with pytest.raises(ValueError, match="discovery_k8s_api_url"):
        make_source(settings)


def test_a_bad_dns_name_stops_the_start_up_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--prefill-servers", "p:1", "--discovery", "dns", "--discovery-dns-decode", "decode.test"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name:port" in err[0] and "decode.test" in err[0]


async def test_the_file_source_reports_at_every_look_while_good_and_not_while_bad(tmp_path: Path) -> None:
    """So pdproxy_discovery_last_success_timestamp_seconds stays fresh for a good file and ages for a bad one."""
    path = tmp_path / "u.yaml"
    path.write_text("decode: [d:1]\n", encoding="utf-8")
    updates = FileSource(path, interval=0.01).updates()
    try:
        first, second = await anext(updates), await anext(updates)
        assert first == second == {Role.PREFILL: (), Role.DECODE: (Target("http://d:1"),)}
        path.write_text("decode: [\n", encoding="utf-8")
        failure = await anext(updates)
        assert isinstance(failure, SourceFailure)
        late = asyncio.ensure_future(anext(updates))
        done, _ = await asyncio.wait({late}, timeout=0.1)  # ten looks at the same bad file: silence
        assert not done
        path.write_text("decode: [d:2]\n", encoding="utf-8")  # a new content is read and reported
        assert await asyncio.wait_for(late, 2) == {Role.PREFILL: (), Role.DECODE: (Target("http://d:2"),)}
    finally:
        await updates.aclose()
