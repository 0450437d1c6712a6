"""A mock SGLang prefill server, for sglang-router's PD mode in benchmarks/harness.py.

    python benchmarks/sglang_prefill.py --port 0 [--ttft-ms 0]

sglang-router 0.3 has no vLLM (NIXL) PD mode: its `--pd-disaggregation` speaks SGLang's protocol.
It sends the client's request, with `bootstrap_host`/`bootstrap_port`/`bootstrap_room` added, to a
prefill server and to a decode server at once; the decode server pulls the KV cache from the
prefill server's bootstrap port and streams the answer; the prefill server's own answer (one token)
is only awaited and dropped. `pdproxy mock --role prefill` would instead generate the whole answer,
so this server stands in for an SGLang prefill server: it answers every generation request with
one token after --ttft-ms (SSE when the request streams, JSON otherwise). The decode side stays
`pdproxy mock --role decode`, which serves a request without `kv_transfer_params` as a full decode.
Like the mock, it advertises no model path (so the router never tries to fetch a tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

ONE_TOKEN = {"id": "cmpl-prefill", "object": "text_completion", "created": 0, "model": "mock",
             "choices": [{"index": 0, "text": " tok0", "logprobs": None, "finish_reason": "length",
                          "stop_reason": None}],
             "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}
ONE_TOKEN_JSON = json.dumps(ONE_TOKEN).encode()
ONE_TOKEN_SSE = b"data: " + ONE_TOKEN_JSON + b"\n\ndata: [DONE]\n\n"


def make_app(ttft_ms: float) -> web.Application:
    async def generate(request: web.Request) -> web.Response:
        body = await request.read()
        if ttft_ms:
            await asyncio.sleep(ttft_ms / 1000)
        try:
            stream = bool(json.loads(body).get("stream"))
        except (ValueError, AttributeError):
            return web.Response(status=400, text="bad JSON")
        if stream:
            return web.Response(body=ONE_TOKEN_SSE, content_type="text/event-stream")
        return web.Response(body=ONE_TOKEN_JSON, content_type="application/json")

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        app.router.add_post(path, generate)
    app.router.add_get("/health", health)
    return app


async def serve(host: str, port: int, ttft_ms: float) -> None:
    runner = web.AppRunner(make_app(ttft_ms), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"sglang-style prefill mock listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(args.host, args.port, args.ttft_ms))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
