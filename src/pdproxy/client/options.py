"""The upstream client's knobs, frozen: parsed once at start-up, read on every call without lookups."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Connection pool and safety limits, shared by every upstream of one client.

    keepalive_timeout stays below the engines' own idle close (uvicorn/vLLM close at 5 s), so the proxy
    normally retires a connection before the server does. max_connections counts open connections per upstream
    (busy and idle); 0 means no cap, otherwise a call waits for a free one, bounded by connect_timeout.
    """

    connect_timeout: float = 5.0
    keepalive_timeout: float = 4.0
    max_connections: int = 0
    max_idle: int = 256
    max_response_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
