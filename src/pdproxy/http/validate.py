"""Checks on what a client sends, as pure functions the request path calls: JSON nesting depth,
request ids fit for a log line, loop detection through `Via`, and upstreams that are the proxy itself.

Each one costs next to nothing on a normal request: the request path calls them on every request.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from pdproxy.errors import InvalidRequest

# orjson parses up to 1024 levels of arrays and objects but serializes only 254, so a deeper body
# failed as a 500 when the prefill body was written (probe F4). Real OpenAI bodies (messages, content
# parts, tool schemas) nest a few dozen levels at most.
MAX_JSON_DEPTH = 254

MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")


def json_depth_ok(document: Any) -> bool:
    """True when `document` (parsed JSON) nests at most MAX_JSON_DEPTH levels: when orjson can write
    it back, which is what the request path does with it.

    Serializing is the cheapest exact test (measured on a 4 KiB chat body, 2 cores: 1.4 µs, less than
    counting its `[` and `{` bytes, 7.8 µs, or a Python walk of a 100-message chat, 390 µs); it runs
    in C and stops at the first level too deep."""
    try:
        orjson.dumps(document)
    except orjson.JSONEncodeError as exc:
        if "recursion" in str(exc).lower():
            return False
        raise
    return True


def loads_request(raw: bytes) -> Any:
    """Parse a client's JSON body; InvalidRequest (400) when it is not JSON or nests too deep."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():  # orjson's own limit (1024 levels)
            raise InvalidRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not json_depth_ok(document):
        raise InvalidRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return document


def sanitize_request_id(value: str | None) -> str | None:
    """The client's request id when it is 1-128 of `A-Z a-z 0-9 . _ : -`, else None (make a new one).

    Anything else (spaces, quotes, control bytes) could forge fields of the text access log."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return None


# -- loop protection -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class LoopGuard:
    """This proxy's pseudonym in `Via` (RFC 9110 §7.6.3): added to every upstream request, and a
    request that already carries it has come back through an upstream that points at this proxy.

    The pseudonym is random per instance, so two pdproxy instances chained on purpose never take
    each other for themselves; worker processes may share one (pass the same `token`)."""

    token: str

    @classmethod
    def create(cls, token: str | None = None) -> LoopGuard:
        return cls(token or f"pdproxy-{secrets.token_hex(6)}")

    def seen_self(self, via: str | None) -> bool:
        """Whether the `Via` header value lists this proxy (each entry: protocol, received-by, comment)."""
        if not via or self.token not in via:  # the common case: one substring test
            return False
        for entry in via.split(","):
            parts = entry.split()
            if len(parts) >= 2 and parts[1] == self.token:
                return True
        return False

    def via_header(self, incoming: str | None = None) -> str:
        """The `Via` value for an upstream request: the client's entries (so a loop through other
        proxies is seen too) with this proxy's appended."""
        own = f"1.1 {self.token}"
        return f"{incoming}, {own}" if incoming else own


def listen_addresses_conflict(url: str, own_addresses: Iterable[tuple[str, int]],
                              local_hosts: Iterable[str] = ()) -> bool:
    """Whether the upstream `url` (normalized) is one of this proxy's own listeners.

    `own_addresses` are (host, port) pairs the proxy listens on (`0.0.0.0`/`::`/`""` for every
    address); `local_hosts` other names or addresses of this machine the caller knows (its host
    name, say). Names are not resolved (no DNS on the admin path): the `Via` token catches the rest."""
    parts = urlsplit(url)
    host, port = (parts.hostname or "").lower().rstrip("."), parts.port
    local = {h.lower().strip("[]") for h in local_hosts}
    for own_host, own_port in own_addresses:
        if port != own_port:
            continue
        own = own_host.lower().strip("[]")
        if host == own:
            return True
        if own in ("", "0.0.0.0", "::"):  # every address of this machine reaches it
            if host == "localhost" or host in local or _kind(host) in ("loopback", "any"):
                return True
        elif _kind(own) == "loopback" and (host == "localhost" or _kind(host) == "any"):
            return True  # Linux connects to 0.0.0.0 as to the loopback address
    return False


def _kind(host: str) -> str:
    """'loopback', 'any' (the unspecified address) or 'other' for an IP literal or a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "other"
    mapped = getattr(address, "ipv4_mapped", None)
    if address.is_loopback or (mapped is not None and mapped.is_loopback):
        return "loopback"
    return "any" if address.is_unspecified else "other"
