"""Discovery: upstreams found without hand edits (a file, DNS names, Kubernetes EndpointSlices).

A source (base.Source) yields desired lists; the reconciler applies them through Membership, the one
writer of the pools. `build_discovery` makes both from Settings; the app starts and stops it with its
own lifetime (`Discovery.lifetime`, an aiohttp cleanup context, or `start`/`stop`).

The state file (--state-file) and discovery: members a source added are never written to the state file
(Membership._snapshot keeps only configured and admin-made ones), since the source lists them again at
start-up; so with both, a restart restores the hand-made changes and discovery refills the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pdproxy.discovery.base import Source, SourceFailure, Target
from pdproxy.discovery.reconciler import Reconciler
from pdproxy.membership import Membership
from pdproxy.metrics import Metrics
from pdproxy.settings import Settings
from pdproxy.upstreams import Role

__all__ = ["Discovery", "Source", "SourceFailure", "Target", "build_discovery", "make_source"]

log = logging.getLogger("pdproxy.discovery")


def make_source(settings: Settings) -> Source | None:
    """The configured source, or None (discovery=none). ValueError names a wrong setting."""
    if settings.discovery == "file":
        from pdproxy.discovery.file import FileSource

        assert settings.discovery_file is not None  # Settings checks it
        return FileSource(settings.discovery_file, interval=settings.discovery_interval)
    if settings.discovery == "dns":
        from pdproxy.discovery.dns import DnsSource, parse_names

        names = {Role.PREFILL: parse_names(settings.discovery_dns_prefill),
                 Role.DECODE: parse_names(settings.discovery_dns_decode)}
        return DnsSource(names, interval=settings.discovery_interval, timeout=settings.discovery_dns_timeout,
                         scheme=settings.discovery_scheme, nameserver=settings.discovery_dns_nameserver)
    if settings.discovery == "kubernetes":
        from pdproxy.discovery.kubernetes import KubernetesSource, default_namespace, in_cluster_api_url

        api_url = settings.discovery_k8s_api_url or in_cluster_api_url()
        if api_url is None:
            raise ValueError("discovery=kubernetes: set discovery_k8s_api_url (not running in a cluster: "
                             "KUBERNETES_SERVICE_HOST is not set)")
        selectors = {Role.PREFILL: settings.discovery_k8s_prefill_selector,
                     Role.DECODE: settings.discovery_k8s_decode_selector}
        return KubernetesSource(selectors, api_url=api_url,
                                namespace=settings.discovery_k8s_namespace or default_namespace(),
                                port=settings.discovery_k8s_port, scheme=settings.discovery_scheme,
                                token_file=settings.discovery_k8s_token_file, ca_file=settings.discovery_k8s_ca_file)
    return None


class Discovery:
    """One source and its reconciler, run as one task for the application's lifetime."""

    def __init__(self, source: Source, reconciler: Reconciler) -> None:
        self.source = source
        self.reconciler = reconciler
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.reconciler.run(self.source))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def lifetime(self, app: Any = None) -> AsyncIterator[None]:
        """As an aiohttp cleanup context: discovery runs while the application runs."""
        self.start()
        try:
            yield
        finally:
            await self.stop()


def build_discovery(settings: Settings, membership: Membership, metrics: Metrics | None,
                    caps: Mapping[Role, int]) -> Discovery | None:
    source = make_source(settings)
    if source is None:
        return None
    if metrics is not None:
        metrics.watch_discovery(source.name)
    reconciler = Reconciler(membership, source.name, removal_delay=settings.discovery_removal_delay, caps=caps,
                            metrics=metrics)
    log.info("discovery: %s (removal delay %gs)", source.name, settings.discovery_removal_delay)
    return Discovery(source, reconciler)
