"""The helper process that parses large bodies off the loop: verdicts, and every way it can fail (crash, hang,
the client gone mid-parse, shutdown) ends in a clear error and a killed helper, never a hang or a half-read pipe."""

from __future__ import annotations

import asyncio
import sys

import orjson
import pytest

from pdproxy.errors import InvalidRequest, Unavailable
from pdproxy.http.parse_process import ParseProcess

CRASHES = (sys.executable, "-c", "import sys; sys.stdin.buffer.read(9); sys.exit(3)")
HANGS = (sys.executable, "-c", "import sys, time; sys.stdin.buffer.read(9); time.sleep(60)")


async def test_a_valid_body_comes_back_parsed_and_bad_ones_are_the_clients_400() -> None:
    parser = ParseProcess()
    try:
        document = {"model": "m", "prompt": "é" * 100_000, "max_tokens": 3, "n": None}
        assert await parser.parse(bytearray(orjson.dumps(document))) == document
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            await parser.parse(b'{"prompt": "unterminated')
        with pytest.raises(InvalidRequest, match="nests deeper than 254"):
            await parser.parse(b"[" * 300 + b"]" * 300)
        assert await parser.parse(b"[1, 2]") == [1, 2]  # the caller judges the shape
        assert parser.started == 1  # one helper served them all
    finally:
        await parser.stop()
    assert parser._process is None


async def test_a_crashed_helper_is_a_503_and_the_next_body_starts_a_fresh_one() -> None:
    parser = ParseProcess(CRASHES)
    try:
        with pytest.raises(Unavailable) as caught:
            await parser.parse(b'{"prompt": "x"}')
        assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "1"
        parser._command = ParseProcess()._command  # the real helper from now on
        assert await parser.parse(b'{"prompt": "x"}') == {"prompt": "x"}
        assert parser.started == 2
    finally:
        await parser.stop()


async def test_a_hung_helper_times_out_and_is_killed() -> None:
    parser = ParseProcess(HANGS, timeout_base=0.3, seconds_per_mb=0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable, match="could not parse"):
        await parser.parse(b'{"prompt": "x"}')
    assert loop.time() - started < 2.5
    assert parser._process is None  # killed and reaped
    await parser.stop()


async def test_a_client_gone_mid_parse_kills_the_helper() -> None:
    parser = ParseProcess(HANGS, timeout_base=30)
    task = asyncio.create_task(parser.parse(b'{"prompt": "x"}'))
    done, _ = await asyncio.wait([task], timeout=0.3)  # the helper sleeps: the parse cannot end
    assert not done
    process = parser._process
    assert process is not None and process.returncode is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert parser._process is None and process.returncode is not None


async def test_stop_kills_a_running_helper() -> None:
    parser = ParseProcess()
    assert await parser.parse(b"{}") == {}
    process = parser._process
    assert process is not None and process.returncode is None
    await parser.stop()
    assert process.returncode is not None
