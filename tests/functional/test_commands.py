"""The console commands as a user runs them: real processes, real sockets, signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
URL = re.compile(rb"(http://127\.0\.0\.1:\d+)")


async def spawn(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdproxy", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def read_url(process: asyncio.subprocess.Process, marker: bytes) -> str:
    """Read the process's output until the line with `marker`; return the URL on it."""
    assert process.stdout is not None
    async with asyncio.timeout(20) if sys.version_info >= (3, 11) else _no_timeout():
        while True:
            line = await process.stdout.readline()
            assert line, f"process exited before printing {marker!r}"
            if marker in line and (match := URL.search(line)):
                return match.group(1).decode()


class _no_timeout:  # Python 3.10 has no asyncio.timeout; the test's own timeout still applies
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 10)


async def test_demo_serves_a_stream(processes: list[asyncio.subprocess.Process]) -> None:
    demo = await spawn("demo", "--port", "0")
    processes.append(demo)
    url = await read_url(demo, b"pdproxy demo is up")
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/completions", json={"model": "mock", "prompt": "hello", "max_tokens": 16, "stream": True}
    ) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.count(b"data: ") == 17 and body.endswith(b"data: [DONE]\n\n")
    assert await stop(demo) == 0


async def test_serve_in_front_of_mock_processes(processes: list[asyncio.subprocess.Process]) -> None:
    mocks = [await spawn("mock", "--role", role, "--port", "0") for role in ("prefill", "prefill", "decode")]
    processes.extend(mocks)
    urls = [await read_url(m, b"listening on") for m in mocks]
    proxy = await spawn("--prefill-servers-list", f"{urls[0]},{urls[1]}", "--decode-servers", urls[2],
                        "--listen-port", "0", "--host", "127.0.0.1")
    processes.append(proxy)
    url = await read_url(proxy, b"pdproxy listening on")
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            async with http.post(url + "/v1/chat/completions", json={
                "model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            }) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"] == " tok0 tok1 tok2"
        async with http.get(urls[2] + "/stats") as resp:
            assert (await resp.json())["decodes_with_valid_handle"] == 4
    assert await stop(proxy) == 0
    for mock in mocks:
        assert await stop(mock) == 0


async def test_invalid_settings_exit_2_with_one_line() -> None:
    process = await spawn("--prefill-servers", "a:1", "--decode-servers", "b:99999")
    output, _ = await process.communicate()
    assert process.returncode == 2
    lines = output.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdproxy: invalid settings: decode_servers")
