"""Honest `usage.prompt_tokens_details.cached_tokens`: what P found in its prefix cache, not what D received.

vLLM counts tokens loaded through a KV connector as cached, so a D that got the whole prompt from P reports
the whole prompt as cached, and clients that bill on `cached_tokens` would discount every PD request. The
proxy knows P's own count from P's (parsed) answer and rewrites that one number in D's answer: a byte
search for `"cached_tokens":`, never a parse of D's answer or of a chunk.

Invariants:
- only requests whose D got P's KV are rewritten (a D that recomputed reports its own cache, which is true);
- a stream is searched only when the client asked for usage in it (`stream_options.include_usage` or
  `continuous_usage_stats`): every other stream is relayed by the plain `Relay`, at its cost;
- a search never misses a field split across two reads: the tail that could start the field (or a number
  that could go on) is held back and written with the next read, or at the end;
- the token count of the content itself cannot match: inside a JSON string the quotes are escaped
  (`\\"cached_tokens\\":`), so the pattern with its bare closing quote and colon does not occur there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pdproxy.client import CallError, Stream
from pdproxy.proxy.relay import Gaps, Relay, Sink

FIELD = b'"cached_tokens":'
_DIGITS = b"0123456789"
_SPACE = b" \t\r\n"


def prefill_cached_tokens(answer: dict[str, Any] | None) -> int | None:
    """P's cached prompt tokens from its parsed answer: its `prompt_tokens_details.cached_tokens`, 0 when its
    usage has none (vLLM leaves the field out at 0), None when P reported no usage at all."""
    usage = answer.get("usage") if answer else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0 else 0


def usage_in_stream(body: dict[str, Any]) -> bool:
    """Whether a streamed answer will carry usage (and so maybe `cached_tokens`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage") or options.get("continuous_usage_stats"))


def _partial_field_start(data: bytes) -> int:
    """Where a proper prefix of FIELD ends `data` (the field may be split there), or -1."""
    at = data.find(b'"', max(0, len(data) - len(FIELD) + 1))
    while at >= 0:
        if FIELD.startswith(data[at:]):
            return at
        at = data.find(b'"', at + 1)
    return -1


def rewrite_cached_tokens(data: bytes, cached: bytes, *, final: bool = True) -> tuple[bytes, bytes]:
    """`data` with every `"cached_tokens": N` set to `cached`, and the tail held back (empty when `final`):
    a piece that may be the start of the field, or a field whose number may go on in the next read."""
    at = data.find(FIELD)
    if at < 0:
        cut = -1 if final else _partial_field_start(data)
        return (data, b"") if cut < 0 else (data[:cut], data[cut:])
    parts: list[bytes] = []
    start = 0
    size = len(data)
    while at >= 0:
        begin = at + len(FIELD)
        while begin < size and data[begin] in _SPACE:
            begin += 1
        end = begin
        while end < size and data[end] in _DIGITS:
            end += 1
        if end == size and not final:  # the number may go on: hold the field back
            parts.append(data[start:at])
            return b"".join(parts), data[at:]
        if end > begin:
            parts += (data[start:begin], cached)
            start = end
        at = data.find(FIELD, end)
    rest = data[start:]
    cut = -1 if final else _partial_field_start(rest)
    if cut < 0:
        parts.append(rest)
        return b"".join(parts), b""
    parts.append(rest[:cut])
    return b"".join(parts), rest[cut:]


class CachedTokensRelay(Relay):
    """A relay that rewrites `cached_tokens` on the way (only for streams that carry usage)."""

    __slots__ = ("_cached", "_carry")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: Stream, out: Sink, *, end: float | None,
                 gaps: Gaps | None, cached: int) -> None:
        self._cached = str(cached).encode()
        self._carry = b""
        super().__init__(loop, stream, out, end=end, gaps=gaps)

    def on_data(self, data: bytes) -> None:
        if self._carry:
            data, self._carry = self._carry + data, b""
        data, self._carry = rewrite_cached_tokens(data, self._cached, final=False)
        if data:
            Relay.on_data(self, data)

    def _flush(self) -> None:
        if self._carry:
            carry, self._carry = self._carry, b""
            Relay.on_data(self, rewrite_cached_tokens(carry, self._cached)[0])

    def on_end(self) -> None:
        self._flush()
        Relay.on_end(self)

    def on_error(self, error: CallError) -> None:
        self._flush()
        Relay.on_error(self, error)


def make_relay(loop: asyncio.AbstractEventLoop, stream: Stream, out: Sink, *, end: float | None,
               gaps: Gaps | None, cached: int | None) -> Relay:
    """The plain relay, or the rewriting one when there is a P count to report (`cached` not None)."""
    if cached is None:
        return Relay(loop, stream, out, end=end, gaps=gaps)
    return CachedTokensRelay(loop, stream, out, end=end, gaps=gaps, cached=cached)
