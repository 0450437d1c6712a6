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


async def read_line(process: asyncio.subprocess.Process, marker: bytes) -> bytes:
    """Read the process's output until a line containing `marker`, and return that line."""
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line, f"process exited before printing {marker!r}"
        if marker in line:
            return line


async def read_url(process: asyncio.subprocess.Process, marker: bytes) -> str:
    """The URL on the first output line containing `marker`."""
    match = URL.search(await read_line(process, marker))
    assert match, f"no URL on the {marker!r} line"
    return match.group(1).decode()


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


async def test_sigterm_drains_open_streams_and_refuses_new_ones(
    processes: list[asyncio.subprocess.Process],
) -> None:
    from pdproxy.mock import MockConfig, start_mock

    engines = [await start_mock(MockConfig(role=role)) for role in ("prefill", "decode")]
    try:
        proxy = await spawn("--prefill-servers", engines[0][2], "--decode-servers", engines[1][2],
                            "--host", "127.0.0.1", "--port", "0", "--drain-timeout", "20")
        processes.append(proxy)
        url = await read_url(proxy, b"pdproxy listening on")
        async with aiohttp.ClientSession() as http:
            async def stream() -> bytes:
                async with http.post(url + "/v1/completions", json={
                    "model": "mock", "prompt": "hi", "max_tokens": 40, "stream": True}) as resp:
                    return await resp.read()

            decode = engines[1][0]
            decode.hold()  # the streams stay open until the checks below are done
            streams = [asyncio.create_task(stream()) for _ in range(3)]
            await decode.wait_until(lambda stats: stats.in_flight == 3)
            proxy.send_signal(signal.SIGTERM)
            await read_line(proxy, b"draining")
            async with http.get(url + "/health") as resp:
                assert resp.status == 503
            async with http.post(url + "/v1/completions", json={"model": "mock", "prompt": "x"}) as resp:
                assert resp.status == 503
                assert "shutting down" in (await resp.json())["error"]["message"]
            decode.release()
            bodies = await asyncio.gather(*streams)
        assert all(body.count(b"data: ") == 41 and body.endswith(b"data: [DONE]\n\n") for body in bodies)
        assert await asyncio.wait_for(proxy.wait(), 10) == 0
        assert decode.stats.completed == 3 and decode.stats.aborted == 0
    finally:
        for _, runner, _ in engines:
            await runner.cleanup()
