"""Client API keys (`--api-key`, `--api-key-file`): `Authorization: Bearer KEY` checked as vLLM does, in
constant time, before a request reaches a route; optionally a cap on each key's requests in flight.

Invariants:
- a key is kept only as its SHA-256 digest, and a check compares the presented key's digest with every
  configured digest (`hmac.compare_digest`, no early exit), so neither the timing nor a log line says
  which key, or how much of one, matched; keys are never logged, and a refusal's message never quotes
  what the client sent;
- a key's in-flight count is taken before the handler runs and given back in `finally`, whatever ends
  the request (a stream ends when its handler returns).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pdproxy.errors import ProxyError, TooManyRequests, Unauthorized
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.http.router import Handler

#: Routes any client may call with keys on (vLLM leaves these open too: probes and scrapes carry no key).
PUBLIC_PATHS = frozenset({"/health", "/livez", "/metrics"})


Refuse = Callable[[Request, ProxyError], Response]


@dataclass(slots=True)
class ClientKey:
    """One configured key: its digest, its cap on requests in flight (0: none) and how many it has."""

    digest: bytes
    max_in_flight: int = 0
    in_flight: int = 0


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_key_file(path: Path) -> list[tuple[str, int]]:
    """`KEY` or `KEY MAX_IN_FLIGHT` per line; blank lines and `#` comments skipped. ValueError (never quoting
    a key) for a line that is neither."""
    keys: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not (fields[1].isascii() and fields[1].isdigit())):
            raise ValueError(f"{path}:{number}: want 'KEY' or 'KEY MAX_IN_FLIGHT'")
        keys.append((fields[0], int(fields[1]) if len(fields) == 2 else -1))
    return keys


class ClientKeys:
    """The configured keys; `guard(handler)` refuses requests without a right one (401) or over its cap (429)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[tuple[str, int]], *, default_max_in_flight: int = 0) -> None:
        """`keys`: (key, cap) pairs, a cap of -1 taking `default_max_in_flight`."""
        by_digest: dict[bytes, ClientKey] = {}
        for key, cap in keys:
            if not key:
                raise ValueError("an API key must not be empty")
            digest = _digest(key)
            by_digest[digest] = ClientKey(digest, default_max_in_flight if cap < 0 else cap)
        if not by_digest:
            raise ValueError("no API keys given")
        self._keys = tuple(by_digest.values())

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> ClientKey:
        """The key an `Authorization` header carries; Unauthorized when it carries none that is configured."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(presented.strip())
        found: ClientKey | None = None
        for key in self._keys:  # every digest compared: the time does not depend on which one matches
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def guard(self, handler: Handler, refuse: Refuse) -> Handler:
        """`handler` behind the key check; `refuse(request, error)` answers (and accounts for) a refusal."""
        keys = self

        async def guarded(request: Request) -> Response | None:
            try:
                key = keys.check(request.headers.get("authorization"))
                if key.max_in_flight and key.in_flight >= key.max_in_flight:
                    raise TooManyRequests(f"this API key already has {key.max_in_flight} requests in flight; "
                                          "retry when one ends", retry_after=1)
            except ProxyError as exc:
                return refuse(request, exc)
            key.in_flight += 1
            try:
                return await handler(request)
            finally:
                key.in_flight -= 1

        return guarded
