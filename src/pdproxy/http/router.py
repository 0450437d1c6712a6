"""Method + path routing with `{name}` segments; unknown paths get 404, known paths with a wrong method 405."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

from pdproxy.errors import MethodNotAllowed, NotFound

if TYPE_CHECKING:
    from pdproxy.http.request import Request
    from pdproxy.http.response import Response

Handler = Callable[["Request"], Awaitable["Response | None"]]


class Router:
    """Static paths resolve with one dict lookup; patterns are tried in the order they were added."""

    __slots__ = ("_patterns", "_static")

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[tuple[str, ...], dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Route `method path` to `handler`; `{name}` segments land in `request.match_info[name]`."""
        method = method.upper()
        if "{" not in path:
            self._static.setdefault(path, {})[method] = handler
            return
        segments = tuple(path.strip("/").split("/"))
        for known, methods in self._patterns:
            if known == segments:
                methods[method] = handler
                return
        self._patterns.append((segments, {method: handler}))

    def resolve(self, request: Request) -> Handler:
        """The handler for this request (filling match_info), or one that answers 404/405."""
        methods = self._static.get(request.path)
        if methods is None:
            methods = self._match(request)
        if methods is None:
            return _refuse(NotFound(f"unknown route: {request.method} {request.path}"))
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            error = MethodNotAllowed(f"method {request.method} is not allowed on {request.path}; use {allowed}")
            error.headers["Allow"] = allowed
            return _refuse(error)
        return handler

    def _match(self, request: Request) -> dict[str, Handler] | None:
        if not self._patterns:
            return None
        parts = request.raw_path.strip("/").split("/")
        for segments, methods in self._patterns:
            if len(segments) != len(parts):
                continue
            params: dict[str, str] = {}
            for segment, part in zip(segments, parts, strict=True):
                if segment.startswith("{") and segment.endswith("}"):
                    if not part:
                        break
                    params[segment[1:-1]] = unquote(part) if "%" in part else part
                elif segment != part:
                    break
            else:
                request.match_info = params
                return methods
        return None


def _refuse(error: Exception) -> Handler:
    async def refuse(request: Request) -> Response | None:
        raise error

    return refuse
