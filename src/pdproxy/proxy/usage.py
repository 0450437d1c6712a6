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
  (`\\"cached_tokens\\":`), so the pattern with its bare closing quote and colon does not occur there;
- concurrent plans (P and D at once) may see D's usage before P's answer: the usage is held (D's stream
  paused) until P answered or `PendingCached.grace` passed, then written with P's count, or D's own when P
  told none in time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from pdproxy.client import CallError, Stream
from pdproxy.proxy.relay import Gaps, Relay, Sink

FIELD = b'"cached_tokens":'
_DIGITS = b"0123456789"
_SPACE = b" \t\r\n"


def prefill_cached_tokens(answer: dict[str, Any] | None) -> int | None:
    """P's cached prompt tokens from its parsed answer: its `prompt_tokens_details.cached_tokens`, 0 when its
    usage has none (vLLM and SGLang leave the field out at 0), None when P reported no usage at all. SGLang's
    native answer (`/generate`) has no usage but `meta_info.cached_tokens`: taken too."""
    usage = answer.get("usage") if answer else None
    if not isinstance(usage, dict):
        meta = answer.get("meta_info") if answer else None
        cached = meta.get("cached_tokens") if isinstance(meta, dict) else None
        return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0 else None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0 else 0


def answer_cached_tokens(body: bytes) -> int | None:
    """P's cached prompt tokens from its raw answer (a concurrent plan's P leg): a JSON object, or an SSE stream
    (SGLang's P streams when the client streams), whose last event with a usage object is parsed. P's answer is
    one token long, a few small events: this parse is once per request, never on D's stream."""
    data = body.lstrip()
    if data.startswith(b"{"):
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return prefill_cached_tokens(answer) if isinstance(answer, dict) else None
    for event in reversed(data.split(b"\n\n")):
        payload = event.strip()
        if not payload.startswith(b"data:") or (b'"usage"' not in payload and b'"meta_info"' not in payload):
            continue
        try:
            answer = orjson.loads(payload[5:])
        except orjson.JSONDecodeError:
            continue
        found = prefill_cached_tokens(answer) if isinstance(answer, dict) else None
        if found is not None:
            return found
    return None


@dataclass(slots=True)
class PendingCached:
    """A concurrent plan's P count, known once P answered (`future`: the count, or None when P told none or
    failed). D's leg waits for it at most `grace` seconds before it writes the usage."""

    future: asyncio.Future[int | None]
    grace: float

    def known(self) -> tuple[bool, int | None]:
        """(whether P's answer is in, its count)."""
        future = self.future
        if not future.done() or future.cancelled():
            return future.done(), None
        return True, future.result()

    async def wait(self) -> int | None:
        """P's count once P answered, None when it told none or did not answer within `grace`."""
        if not self.future.done():
            await asyncio.wait((self.future,), timeout=self.grace)
        return self.known()[1]

    def settle(self, cached: int | None) -> None:
        """P's leg ended (answered, failed or cancelled): D's leg need not wait any longer."""
        if not self.future.done():
            self.future.set_result(cached)


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


class PendingCachedTokensRelay(CachedTokensRelay):
    """A concurrent plan's relay while P has not answered yet: bytes flow until the first `"cached_tokens":`,
    which is held (D's stream paused) until P's count is in or its grace passed; then the rewriting relay's
    path (or the plain one, P having told nothing in time) from there on.

    Invariants: only the usage event and what follows it are held (the usage is the stream's last event, so
    no token waits); D's end while holding is deferred until the hold is released, so `done` never resolves
    before the usage was written; the client's back-pressure and the hold each keep D paused until both let go."""

    __slots__ = ("_ended_with", "_held", "_holding", "_pending", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: Stream, out: Sink, *, end: float | None,
                 gaps: Gaps | None, pending: PendingCached) -> None:
        self._pending: PendingCached | None = pending
        self._held: list[bytes] = []
        self._holding = False
        self._ended_with: tuple[bool, CallError | None] | None = None  # (ended?, error) deferred by a hold
        self._timer: asyncio.TimerHandle | None = None
        super().__init__(loop, stream, out, end=end, gaps=gaps, cached=0)
        self._cached = b""  # no count yet: a carry flushed meanwhile goes out as D wrote it
        pending.future.add_done_callback(self._known)

    def on_data(self, data: bytes) -> None:
        if self._pending is None:  # P's count is in (or its grace passed)
            if self._cached:
                CachedTokensRelay.on_data(self, data)
            else:
                Relay.on_data(self, self._take_carry() + data)
            return
        if self._holding:
            self._held.append(data)
            return
        data = self._take_carry() + data
        at = data.find(FIELD)
        if at < 0:
            cut = _partial_field_start(data)
            if cut >= 0:
                data, self._carry = data[:cut], data[cut:]
            if data:
                Relay.on_data(self, data)
            return
        if at:
            Relay.on_data(self, data[:at])
        self._held.append(data[at:])
        self._holding = True
        self._stream.pause()  # nothing more is read until the hold is released
        self._timer = self._loop.call_later(self._pending.grace, self._release)

    def on_end(self) -> None:
        if self._holding:
            self._ended_with = (True, None)
            return
        CachedTokensRelay.on_end(self)

    def on_error(self, error: CallError) -> None:
        if self._holding:
            self._ended_with = (True, error)
            return
        CachedTokensRelay.on_error(self, error)

    def _drained(self) -> None:
        if self._holding:
            self._paused = False  # the client caught up; the hold still keeps D paused
            return
        Relay._drained(self)

    def _known(self, _future: asyncio.Future[int | None]) -> None:
        self._release()

    def _release(self) -> None:
        """P's count is in, or the grace passed: write what was held and let D flow again."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cached = pending.known()[1]
        self._cached = b"" if cached is None else str(cached).encode()
        if not self._holding or self._ended:
            self._held.clear()
            self._holding = False
            return
        held, self._held, self._holding = b"".join(self._held), [], False
        self.on_data(held)
        ended = self._ended_with
        if ended is not None:
            self._ended_with = None
            if ended[1] is None:
                self.on_end()
            else:
                self.on_error(ended[1])
        elif not self._paused:
            self._stream.resume()

    def _take_carry(self) -> bytes:
        carry, self._carry = self._carry, b""
        return carry

    def _flush(self) -> None:
        if self._carry and not self._cached:  # P told nothing: D's bytes as they are
            carry, self._carry = self._carry, b""
            Relay.on_data(self, carry)
            return
        CachedTokensRelay._flush(self)

    def _finish(self, outcome: CallError | str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = None  # a late answer from P finds the relay ended
        Relay._finish(self, outcome)


def make_relay(loop: asyncio.AbstractEventLoop, stream: Stream, out: Sink, *, end: float | None,
               gaps: Gaps | None, cached: int | None, pending: PendingCached | None = None) -> Relay:
    """The plain relay, or the rewriting one when there is a P count to report (`cached` not None), or the
    holding one when P's count is still to come (`pending`, a concurrent plan's)."""
    if pending is not None:
        known, value = pending.known()
        if not known:
            return PendingCachedTokensRelay(loop, stream, out, end=end, gaps=gaps, pending=pending)
        cached = value
    if cached is None:
        return Relay(loop, stream, out, end=end, gaps=gaps)
    return CachedTokensRelay(loop, stream, out, end=end, gaps=gaps, cached=cached)
