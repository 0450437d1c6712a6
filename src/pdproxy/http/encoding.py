"""Request Content-Encoding: gzip/deflate decoded with a cap on the decoded size (a zip bomb costs at most
`limit` bytes and is refused with 413 as soon as it passes it)."""

from __future__ import annotations

import zlib

from pdproxy.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body decoded per its Content-Encoding; raises the client's error (400, 413, 415) otherwise."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    if name in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, "gzip", limit)
    if name == "deflate":
        try:  # RFC 9110's deflate is zlib-wrapped; some clients send raw deflate: accept both
            return _inflate(body, zlib.MAX_WBITS, "deflate", limit)
        except InvalidRequest:
            return _inflate(body, -zlib.MAX_WBITS, "deflate", limit)
    raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r} (identity, gzip or deflate)",
                               param="Content-Encoding")


def _inflate(body: bytes, wbits: int, name: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidRequest(f"the request body is not valid {name}", param="Content-Encoding") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the decoded request body is larger than {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise InvalidRequest(f"the request body is not valid {name}", param="Content-Encoding")
    return out
