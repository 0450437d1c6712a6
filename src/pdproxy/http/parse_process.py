"""Large request bodies parsed off the event loop, in one small helper process per worker.

orjson holds the GIL while it parses, so a thread does not help: a 90 MB body takes 0.3-0.7 s on a loaded
2-core box, and every other client of the worker (even `/health`) would wait that long. A body of at least
`LARGE_BODY_BYTES` is therefore written to a helper process (`python -m pdproxy.http.parse_process`) through a
pipe (uvloop writes it from the buffer as the pipe drains: no copy, no long loop step), parsed and checked there
(JSON, nesting depth) and answered as a verdict: the client's 400 message, or the document pickled back.

The helper is started on the first large body, serves one body at a time (a lock: the body budget already bounds
how many large bodies a worker holds), and is killed on shutdown. Every exchange is bounded by a timeout; one
that does not end with a whole verdict (timeout, crash, the client gone mid-parse) kills the helper, so the next
large body starts a fresh one and the pipe never carries a half-read answer. The client then gets 503 +
Retry-After, never a hang.

Wire format, both ways: one kind byte, an 8-byte big-endian length, the payload. To the helper: b"B" + the body.
From it: b"D" + a pickled document, or b"E" + the UTF-8 message of the client's InvalidRequest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
from collections.abc import Sequence
from typing import Any

from pdproxy.errors import InvalidRequest, Unavailable

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover - aiohttp depends on async-timeout there
    from async_timeout import timeout as deadline
from pdproxy.http.validate import loads_request

logger = logging.getLogger("pdproxy.http")

PARSE_TIMEOUT_BASE = 10.0  # seconds for the helper's start and a small body...
PARSE_SECONDS_PER_MB = 0.1  # ...plus this per MB (~10x what a loaded box needs)
HELPER_COMMAND = (sys.executable, "-m", "pdproxy.http.parse_process")
KILL_WAIT = 2.0  # bound on reaping a killed helper
_HEAD = struct.Struct(">cQ")


class ParseProcess:
    """The worker's side of the helper. `parse(raw)` -> the document; InvalidRequest (400) for a body that is no
    JSON or nests too deep; Unavailable (503, Retry-After) when the helper failed or took too long."""

    def __init__(self, command: Sequence[str] = HELPER_COMMAND, *, timeout_base: float = PARSE_TIMEOUT_BASE,
                 seconds_per_mb: float = PARSE_SECONDS_PER_MB) -> None:
        """`command` starts the helper (tests: one that crashes or hangs); a body of n MB gets
        `timeout_base + seconds_per_mb * n` seconds, waiting for the helper included."""
        self._command = tuple(command)
        self._timeout_base = timeout_base
        self._seconds_per_mb = seconds_per_mb
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.started = 0  # helpers started so far (a crash or a timeout costs one)

    def start(self) -> None:
        """Nothing: the helper starts with the first large body (most deployments never see one)."""

    async def parse(self, raw: bytes | bytearray) -> Any:
        timeout = self._timeout_base + self._seconds_per_mb * len(raw) / 1e6
        try:
            async with deadline(timeout):
                async with self._lock:
                    return await self._exchange(raw)
        except (TimeoutError, asyncio.TimeoutError):
            logger.warning("the body parse process did not answer a %d-byte body within %.0f s; restarting it",
                           len(raw), timeout)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, pickle.UnpicklingError, ValueError) as exc:
            logger.error("the body parse process failed (%s: %s); restarting it", type(exc).__name__, exc)
        raise Unavailable("pdproxy could not parse the request body in time; retry shortly", retry_after=1)

    async def _exchange(self, raw: bytes | bytearray) -> Any:
        """One body to the helper and its verdict back. Invariant: any way out of here but a whole verdict
        (an error, the timeout's or the client's cancellation) kills the helper: its pipe is mid-message."""
        process = self._process
        if process is None or process.returncode is not None:
            process = self._process = await asyncio.create_subprocess_exec(
                *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            self.started += 1
        done = False
        try:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(_HEAD.pack(b"B", len(raw)))
            process.stdin.write(raw)  # uvloop keeps a reference and writes as the pipe drains
            await process.stdin.drain()
            kind, length = _HEAD.unpack(await process.stdout.readexactly(_HEAD.size))
            payload = await process.stdout.readexactly(length)
            done = True
        finally:
            if not done:
                await self._kill()
        if kind == b"E":
            raise InvalidRequest(payload.decode("utf-8", "replace"))
        if kind != b"D":
            await self._kill()
            raise ValueError(f"unknown verdict {kind!r}")
        return pickle.loads(payload)

    async def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.kill()
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError, ProcessLookupError):
            await asyncio.wait_for(process.wait(), KILL_WAIT)

    async def stop(self) -> None:
        """Shutdown: kill the helper (it holds no state worth a goodbye)."""
        await self._kill()


def _serve(stdin: Any, stdout: Any) -> None:
    """The helper: verdicts for bodies until its stdin closes (the worker exited or killed it)."""
    while head := stdin.read(_HEAD.size):
        if len(head) < _HEAD.size:
            return
        kind, length = _HEAD.unpack(head)
        body = stdin.read(length)
        if kind != b"B" or len(body) < length:
            return
        try:
            payload, answer = pickle.dumps(loads_request(body), pickle.HIGHEST_PROTOCOL), b"D"
        except InvalidRequest as exc:
            payload, answer = exc.message.encode(), b"E"
        del body
        stdout.write(_HEAD.pack(answer, len(payload)))
        stdout.write(payload)
        stdout.flush()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
