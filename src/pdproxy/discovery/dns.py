"""`dns` discovery: names resolved every `interval` seconds with dnspython's asyncio resolver.

- `name:port`: the name's A and AAAA records, each an upstream on that port. A Kubernetes headless
  Service answers with its ready pods only, so this is the Kubernetes path that needs no API access.
- `_service._proto.name`: its SRV records of the lowest priority (the preferred ones; higher priorities
  are backups), each target's A/AAAA records on the record's port, the record's weight as the weight.

A name that does not exist (NXDOMAIN) or has no such records lists no upstream: that is what a headless
Service with no ready pod answers. A timeout or a server failure tells nothing: the look is a failure and
the last list stays.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from pdproxy.discovery.base import SourceFailure, Target, Update, merge_targets
from pdproxy.upstreams import MAX_WEIGHT, Role, normalize_url

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover - aiohttp depends on async-timeout there
    from async_timeout import timeout as deadline

ADDRESS_TYPES = ("A", "AAAA")


class DnsLookupError(Exception):
    """The DNS server did not answer usefully (timeout, SERVFAIL): nothing can be concluded."""


@dataclass(frozen=True, slots=True)
class DnsName:
    """One configured name: SRV (port from the records) or address records on a fixed port."""

    name: str
    port: int | None  # None: SRV

    @classmethod
    def parse(cls, text: str) -> DnsName:
        text = text.strip()
        if text.startswith("_"):
            return cls(text, None)
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"dns name {text!r}: give name:port (A/AAAA) or _service._proto.name (SRV)")
        return cls(host.strip("[]"), int(port))


def parse_names(text: str) -> tuple[DnsName, ...]:
    return tuple(DnsName.parse(item) for item in text.split(",") if item.strip())


def parse_nameserver(text: str) -> tuple[str, int]:
    """`10.0.0.2`, `10.0.0.2:5353`, `[::1]:5353` or `::1` -> (address, port)."""
    text = text.strip()
    if text.startswith("["):
        address, _, port = text[1:].partition("]")
        return address, int(port.removeprefix(":") or 53)
    if text.count(":") == 1:
        address, port = text.split(":")
        return address, int(port)
    return text, 53


class DnsSource:
    """Resolves each role's names; yields the complete lists after every round."""

    name = "dns"

    def __init__(self, names: Mapping[Role, tuple[DnsName, ...]], *, interval: float, timeout: float,
                 scheme: str = "http", nameserver: str | None = None) -> None:
        self.names = {role: tuple(items) for role, items in names.items() if items}
        self.interval = interval
        self.timeout = timeout
        self.scheme = scheme
        if nameserver:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            address, port = parse_nameserver(nameserver)
            self.resolver.nameservers = [address]
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        # Each query is bounded; a round of queries together is bounded by `timeout` in resolve_all.
        self.resolver.timeout = timeout
        self.resolver.lifetime = timeout
        self.resolver.cache = None  # every round asks the server: the records are what changes

    async def updates(self) -> AsyncIterator[Update]:
        while True:
            yield await self.resolve_all()
            await asyncio.sleep(self.interval)

    async def resolve_all(self) -> Update:
        try:
            async with deadline(self.timeout):
                desired = {}
                for role, names in self.names.items():
                    found: list[Target] = []
                    for name in names:
                        found.extend(await self._resolve(name))
                    desired[role] = merge_targets(found)
                return desired
        except DnsLookupError as exc:
            return SourceFailure(str(exc))
        except (TimeoutError, asyncio.TimeoutError):
            return SourceFailure(f"DNS resolution took longer than {self.timeout}s")

    async def _resolve(self, name: DnsName) -> list[Target]:
        if name.port is not None:
            return [Target(self._url(address, name.port)) for address in await self._addresses(name.name)]
        records = await self._query(name.name, "SRV")
        if not records:
            return []
        best = min(record.priority for record in records)
        targets = []
        for record in records:
            if record.priority != best or str(record.target) == ".":  # "." means: no such service here
                continue
            weight = max(1, min(record.weight, MAX_WEIGHT))  # SRV weight 0 means "no preference"
            for address in await self._addresses(str(record.target)):
                targets.append(Target(self._url(address, record.port), weight))
        return targets

    async def _addresses(self, host: str) -> list[str]:
        addresses: list[str] = []
        for record_type in ADDRESS_TYPES:
            addresses.extend(record.address for record in await self._query(host, record_type))
        return addresses

    async def _query(self, name: str, record_type: str) -> list[Any]:
        try:
            answer = await self.resolver.resolve(name, record_type, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.LifetimeTimeout:
            raise DnsLookupError(f"no answer for {name} {record_type} within {self.timeout}s") from None
        except (dns.resolver.NoNameservers, dns.exception.DNSException) as exc:
            raise DnsLookupError(f"{name} {record_type}: {exc}") from None
        return list(answer)

    def _url(self, address: str, port: int) -> str:
        host = f"[{address}]" if ":" in address else address
        return normalize_url(f"{self.scheme}://{host}:{port}")

