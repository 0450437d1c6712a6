"""The access record of one request: what it did, for its access-log line and its metrics."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import orjson

from pdproxy.tracing import NO_TRACE, RequestTrace

if TYPE_CHECKING:
    from pdproxy.proxy.usage import PendingCached

access_log = logging.getLogger("pdproxy.access")

CLIENT_CLOSED = 499  # nginx's status for "client closed the request", for logs and metrics only


@dataclass(slots=True)
class RequestRecord:
    """One request's route, timings and outcome; filled in as the request goes."""

    request_id: str
    endpoint: str
    start: float
    client: str = "-"
    prefill_upstream: str = "-"
    decode_upstream: str = "-"
    status: int = 0
    prefill_s: float | None = None
    ttft_s: float | None = None
    retries: int = 0
    bytes_out: int = 0
    error: str = ""
    stage: str = "queue"
    prefill_cached_tokens: int | None = None  # P's prefix-cache hit, when D got P's KV (usage reports it)
    pending_cached: PendingCached | None = None  # a concurrent plan's: P's hit, once P answered (D's leg waits)
    trace: RequestTrace = NO_TRACE  # the request's span (tracing on), or the do-nothing one

    def as_text(self, total_s: float) -> str:
        return (
            f"{self.request_id} {self.client} {self.endpoint} {self.status} P={self.prefill_upstream} "
            f"D={self.decode_upstream} prefill_ms={_ms(self.prefill_s)} ttft_ms={_ms(self.ttft_s)} "
            f"total_ms={_ms(total_s)} bytes={self.bytes_out} retries={self.retries}"
            + (f" error={orjson.dumps(self.error).decode()}" if self.error else "")
        )

    def as_json(self, total_s: float) -> str:
        return orjson.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "client": self.client,
            "prefill_upstream": self.prefill_upstream,
            "decode_upstream": self.decode_upstream,
            "status": self.status,
            "prefill_ms": _round_ms(self.prefill_s),
            "ttft_ms": _round_ms(self.ttft_s),
            "total_ms": _round_ms(total_s),
            "bytes_out": self.bytes_out,
            "retries": self.retries,
            "error": self.error or None,
        }).decode()


LogFormat = Callable[[RequestRecord, float], str]
LOG_FORMATS: dict[str, LogFormat | None] = {"text": RequestRecord.as_text, "json": RequestRecord.as_json,
                                            "off": None}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _round_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def reported_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last `"usage"` object in `data`, if any.

    A byte search, not a JSON parse: it runs once per response, on the non-streamed body or
    on the final chunks of a stream (where `include_usage` puts it).
    """
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT_TOKENS.search(data, at)
    completion = _COMPLETION_TOKENS.search(data, at)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)), int(completion.group(1))
