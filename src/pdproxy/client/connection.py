"""One upstream TCP (or TLS) connection as an asyncio Protocol; it carries at most one exchange at a time."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .exchange import Exchange
    from .pool import UpstreamPool


class Connection(asyncio.Protocol):
    """Bytes in go straight to the current exchange's parser; an idle connection must stay silent.

    Invariant: `closed` turns True exactly once (discard or connection_lost), and that is when the pool stops
    counting the connection; a closed connection never goes back to the pool.
    """

    __slots__ = ("closed", "exchange", "idle_handle", "pool", "served", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.served = 0  # completed exchanges: > 0 means a new request rides a reused connection
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: a confused or closing server. Never hand it to a request.
            self.discard()
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost ends a read-until-close body or fails the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.connection_lost(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.lost(exc)

    def discard(self) -> None:
        """Close now and stop counting this connection (errors, cancels, aborts, expiry, over max_idle)."""
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def expire(self) -> None:
        """The idle timer ran out: the server would close it soon anyway, close it first."""
        self.idle_handle = None
        self.discard()
