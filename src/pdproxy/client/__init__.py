"""pdproxy's own upstream HTTP/1.1 client: keep-alive pools on asyncio protocols with httptools.

At the bottom of the dependency order: imports nothing of pdproxy outside this package (and never aiohttp).
"""

from __future__ import annotations

from .client import UpstreamClient
from .errors import (
    BadResponse,
    CallError,
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    ResponseTimeout,
    ResponseTooLarge,
)
from .messages import BodySink, Response, Stream
from .options import ClientOptions

__all__ = [
    "BadResponse",
    "BodySink",
    "CallError",
    "ClientClosed",
    "ClientOptions",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionLost",
    "FirstByteTimeout",
    "IdleTimeout",
    "Response",
    "ResponseTimeout",
    "ResponseTooLarge",
    "Stream",
    "UpstreamClient",
]
