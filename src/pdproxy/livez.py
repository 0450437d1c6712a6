"""Liveness: is this process able to answer at all? Never asks an engine.

Readiness (`/health`) says whether requests can be served now (routable P and D, not draining), so it
fails whenever the engines do; a liveness probe on it would restart healthy proxies during an engine
outage. `/livez` answers from the event loop alone: if it answers, the process is alive, including
while it drains after SIGTERM (restarting a draining proxy would cut its streams).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pdproxy.http.request import Request
from pdproxy.http.response import Response, json_response

LIVEZ_PATH = "/livez"


def liveness(draining: bool) -> tuple[int, dict[str, Any]]:
    """(status, body) of a liveness answer: always 200 while the process answers."""
    return 200, {"status": "alive", "draining": draining}


def livez_handler(draining: Callable[[], bool]) -> Callable[[Request], Awaitable[Response]]:
    """The route's handler (`router.add("GET", LIVEZ_PATH, livez_handler(lambda: flow.draining))`)."""

    async def handler(request: Request) -> Response:
        status, body = liveness(draining())
        return json_response(body, status=status, headers=(("Cache-Control", "no-store"),))

    return handler
