"""Liveness: is this process able to answer at all? Never asks an engine.

Readiness (`/health`) says whether requests can be served now (routable P and D, not draining), so it
fails whenever the engines do; a liveness probe on it would restart healthy proxies during an engine
outage. `/livez` answers from the event loop alone: if it answers, the process is alive, including
while it drains after SIGTERM (restarting a draining proxy would cut its streams).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

LIVEZ_PATH = "/livez"


def liveness(draining: bool) -> tuple[int, dict[str, Any]]:
    """(status, body) of a liveness answer: always 200 while the process answers."""
    return 200, {"status": "alive", "draining": draining}


def livez_handler(draining: Callable[[], bool]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler; with another server, call `liveness()` from its route the same way."""

    async def handler(request: web.Request) -> web.Response:
        status, body = liveness(draining())
        return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})

    return handler
