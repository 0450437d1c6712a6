"""The client-side limits of a listener (issue 15 item 1) and the process-wide request-body budget."""

from __future__ import annotations

from dataclasses import dataclass

# A body at least this long is read into one growing buffer (no join at the end: a
# 90 MB join is one 0.2-0.3 s loop step on a loaded box) and parsed off the loop (http/parse_process.py): at this
# size a parse on the loop costs ~25 ms there, under it the helper's round trip costs more than it saves.
LARGE_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a client may cost a listener; nginx's names where they exist.

    header_timeout: from connect (or from the first byte of a keep-alive request) to the end of a request head.
    body_timeout: between two reads of a request body.
    keepalive_timeout: an idle keep-alive connection is closed (silently) after this.
    max_connections: open connections per process; over it the new one gets 503 (Retry-After: 1) and is closed.
    max_header_bytes / max_headers: request line + headers; over them 431 and close.
    max_body_bytes: 413 on Content-Length before reading, on chunked bodies while reading, on decoded size.
    body_budget_bytes: request-body bytes held at once by all requests of the process; over it 503 + Retry-After.
    send_timeout: a response write that does not drain below the high-water mark within this closes the
        connection and cancels its handler (the client's fault).
    answer_half_closed: a client FIN after a complete request is a half-close (the answer is written, then the
        connection closes) instead of a client that left (its handler cancelled at once; the default).
    """

    header_timeout: float = 60.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 10_000
    max_header_bytes: int = 64 * 1024
    max_headers: int = 128
    max_body_bytes: int = 100 * 1024 * 1024
    body_budget_bytes: int = 512 * 1024 * 1024
    send_timeout: float = 60.0
    answer_half_closed: bool = False


@dataclass(slots=True)
class BodyBudget:
    """Bytes of request bodies held right now (read, or promised by Content-Length), so a burst of large bodies
    gets 503s instead of an OOM. Taken while a body is read, given back when its handler returns."""

    capacity: int
    used: int = 0

    def take(self, size: int) -> bool:
        """Reserve `size` bytes; False (and nothing reserved) if they do not fit."""
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """Return bytes reserved by `take`."""
        self.used -= size
