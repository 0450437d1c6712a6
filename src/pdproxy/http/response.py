"""What a handler returns: a whole response, built once and written in one go by the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Response:
    """A non-streamed response; the server adds Content-Length, Date and Connection itself."""

    status: int = 200
    body: bytes = b""
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "application/json"  # ignored when `headers` carries its own Content-Type


def json_response(value: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A JSON response serialised with orjson."""
    return Response(status=status, body=orjson.dumps(value), headers=headers)
