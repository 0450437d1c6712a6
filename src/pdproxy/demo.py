"""`pdproxy demo`: two mock prefill engines, one mock decode engine and the proxy, in one process."""

from __future__ import annotations

import logging

from aiohttp import web

from pdproxy.app import Runner, build_app, start_server, wait_for_signal
from pdproxy.mock import MockConfig, start_mock
from pdproxy.settings import Settings

log = logging.getLogger("pdproxy.demo")

# Small delays so a curl shows tokens arriving one by one, as from a real engine.
DEMO_PREFILL = MockConfig(role="prefill", ttft_ms=30)
DEMO_DECODE = MockConfig(role="decode", ttft_ms=10, itl_ms=20)


def banner(url: str) -> str:
    """What to try once the demo runs."""
    return f"""
pdproxy demo is up: {url}  (2 mock prefill engines, 1 mock decode engine; Ctrl-C stops)

Try it with curl:
  curl -N {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model":"mock","prompt":"hello","max_tokens":16,"stream":true}}'

or with the openai package:
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for chunk in client.chat.completions.create(
          model="mock", messages=[{{"role": "user", "content": "hello"}}], max_tokens=16, stream=True):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Health: {url}/health    Metrics: {url}/metrics
"""


async def run_demo(host: str, port: int, prefill_policy: str = "least_conn") -> None:
    """Start the mocks on free loopback ports and the proxy on host:port; run until a signal."""
    runners: list[web.AppRunner | Runner] = []
    try:
        prefill_urls = []
        for _ in range(2):
            _, runner, url = await start_mock(DEMO_PREFILL)
            runners.append(runner)
            prefill_urls.append(url)
        _, runner, decode_url = await start_mock(DEMO_DECODE)
        runners.append(runner)
        settings = Settings(
            prefill_servers=",".join(prefill_urls), decode_servers=decode_url, host=host, port=port,
            prefill_policy=prefill_policy,
        )
        proxy_runner, url = await start_server(build_app(settings), host, port)
        runners.insert(0, proxy_runner)
        print(banner(url), flush=True)
        await wait_for_signal()
    finally:
        for runner in runners:
            await runner.cleanup()
