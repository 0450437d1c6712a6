"""`enable_routing(app, settings)`: the one call build_app makes to route on the engines' own view.

KV-cache events (`--kv-events`, pdproxy.routing.kv_wiring) and engine load from /metrics
(`--engine-metrics-interval`, pdproxy.routing.engine_load); each is imported only when on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pdproxy.settings import Settings

if TYPE_CHECKING:
    from pdproxy.app import App


class Background:
    """One task an App runs beside the requests (an `App.services` entry): started and cancelled with it."""

    def __init__(self, run: Callable[[], Awaitable[None]]) -> None:
        self._run = run
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def enable_routing(app: App, settings: Settings) -> None:
    if settings.kv_events:
        from pdproxy.routing.kv_wiring import enable_kv_events

        enable_kv_events(app, settings)
    if settings.engine_metrics_interval:
        from pdproxy.routing.engine_load import enable_engine_load

        enable_engine_load(app, settings.engine_metrics_interval)
