"""A pdproxy process (python -m pdproxy) with a lowered RLIMIT_NOFILE, in front of in-process mock engines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pdproxy.mock import MockConfig, start_mock

SRC = str(Path(__file__).resolve().parents[2] / "src")


def lowered_nofile(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return preexec


class Proxy:
    """One pdproxy process in front of in-process mock engines; its output is collected for the checks."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = bytearray()
        self.url = ""
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.process.stdout is not None
        while b"pdproxy listening on" not in self.output:
            line = await asyncio.wait_for(self.process.stdout.readline(), 20)
            assert line, f"proxy exited: {self.output.decode(errors='replace')}"
            self.output += line
        marker = self.output.split(b"pdproxy listening on", 1)[1].split()[0]
        self.url = marker.decode().rstrip(",")
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output += line

    async def stop(self) -> int:
        self.process.terminate()
        code = await asyncio.wait_for(self.process.wait(), 15)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code


@contextlib.asynccontextmanager
async def proxy_with_nofile(nofile: int, *args: str) -> AsyncIterator[Proxy]:
    engines = [await start_mock(MockConfig(role=role)) for role in ("prefill", "decode")]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdproxy", "--prefill-servers", engines[0][2], "--decode-servers", engines[1][2],
        "--host", "127.0.0.1", "--port", "0", *args, env=env, preexec_fn=lowered_nofile(nofile),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    proxy = Proxy(process)
    try:
        await proxy.start()
        yield proxy
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for _, runner, _ in engines:
            await runner.cleanup()
