"""OpenAI-facing handlers: validate a request once, then hand it to the orchestrator."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pdproxy.errors import InvalidRequest, LoopDetected, ProxyError
from pdproxy.http.request import Request
from pdproxy.http.response import Response, json_response
from pdproxy.http.router import Router
from pdproxy.http.validate import LoopGuard, loads_request, sanitize_request_id
from pdproxy.proxy.fanout import FanOut
from pdproxy.proxy.orchestrator import Orchestrator
from pdproxy.proxy.passthrough import Passthrough
from pdproxy.request import ProxyRequest

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
_FORWARDED_TRACE_HEADERS = ("traceparent", "tracestate")


class OpenAIApi:
    """`/v1/completions`, `/v1/chat/completions`, `/v1/models` and `/health`."""

    def __init__(self, flow: Orchestrator, models: Passthrough, *, upstream_api_key: str | None,
                 loop_guard: LoopGuard, fanout: FanOut) -> None:
        self.flow = flow
        self.fanout = fanout
        self.models_route = models
        self.loop_guard = loop_guard
        self._upstream_authorization = f"Bearer {upstream_api_key}" if upstream_api_key else None

    def add_routes(self, router: Router) -> None:
        router.add("POST", COMPLETIONS, self.completions)
        router.add("POST", CHAT_COMPLETIONS, self.chat_completions)
        router.add("GET", "/v1/models", self.models)
        router.add("GET", "/health", self.health)

    async def completions(self, request: Request) -> Response | None:
        return await self._proxy(request, COMPLETIONS, _check_prompt)

    async def chat_completions(self, request: Request) -> Response | None:
        return await self._proxy(request, CHAT_COMPLETIONS, _check_messages)

    async def _proxy(self, request: Request, endpoint: str, check: Callable[[dict[str, Any]], int]) -> Response | None:
        request_id = _request_id(request)
        try:
            self._check_loop(request)
            body = parse_json_object(request.body)
            request.body = b""  # parsed: the raw bytes are not held for the whole stream
            prompts = check(body)
            stream, n = _check_common(body)
            fan_out = prompts * n > 1  # a batch or several samples: one PD flow each (proxy/fanout.py)
            if fan_out:
                self.fanout.check(prompts, n)
        except ProxyError as exc:
            return self.flow.refuse(request, endpoint, request_id, exc)
        preq = ProxyRequest(endpoint, body, stream, request_id, self._upstream_headers(request, request_id))
        if fan_out:
            return await self.fanout.handle(request, preq, prompts, n)
        return await self.flow.handle(request, preq)

    async def models(self, request: Request) -> Response:
        request_id = _request_id(request)
        try:
            self._check_loop(request)
            response = await self.models_route.forward("GET", "/v1/models", self._upstream_headers(request, request_id,
                                                                                                  json=False),
                                                       request_id)
        except ProxyError as exc:
            response = exc.response(request_id)
        self.flow.metrics.requests.labels("/v1/models", str(response.status)).inc()
        return response

    async def health(self, request: Request) -> Response:
        """200 when at least one P and one D are routable and the proxy is not draining, else 503 with
        the reason. `?verbose=1` lists every upstream."""
        flow = self.flow
        body: dict[str, Any] = {}
        problems = ["draining: pdproxy is shutting down"] if flow.draining else []
        for pool in (flow.prefill_pool, flow.decode_pool):  # readiness follows health, not panic routing
            routable = len(pool.healthy())
            body[pool.role.value] = {"routable": routable, "total": len(pool.members)}
            if pool.check_panic():
                body[pool.role.value]["panic"] = True
            if not routable:
                problems.append(f"no routable {pool.role.value} upstream")
        if request.query().get("verbose", "0") not in ("0", "false", ""):
            body["upstreams"] = [u.describe() for pool in (flow.prefill_pool, flow.decode_pool) for u in pool.members]
            body["in_flight"] = flow.in_flight
            body["queued"] = flow.admission.waiting
        if problems:
            return json_response({"status": "unavailable", "reason": "; ".join(problems), **body}, status=503)
        return json_response({"status": "ok", **body})

    def _check_loop(self, request: Request) -> None:
        """508 for a request that already went through this proxy (an upstream that points back at it)."""
        if self.loop_guard.seen_self(request.headers.get("via")):
            raise LoopDetected("this request already went through this pdproxy: an upstream points back at it")

    def _upstream_headers(self, request: Request, request_id: str, *, json: bool = True) -> bytes:
        """The header lines both legs carry, built once per request."""
        lines = [f"X-Request-Id: {request_id}\r\nVia: {self.loop_guard.via_header(request.headers.get('via'))}\r\n"]
        if json:
            lines.append("Content-Type: application/json\r\n")
        authorization = self._upstream_authorization or request.headers.get("authorization")
        if authorization:
            lines.append(f"Authorization: {authorization}\r\n")
        for name in _FORWARDED_TRACE_HEADERS:
            value = request.headers.get(name)
            if value:
                lines.append(f"{name}: {value}\r\n")
        return "".join(lines).encode("latin-1", "replace")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    body = loads_request(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _request_id(request: Request) -> str:
    """The client's X-Request-Id when it is fit for a log line, else a fresh unique one."""
    return sanitize_request_id(request.headers.get("x-request-id")) or os.urandom(16).hex()


def _check_common(body: dict[str, Any]) -> tuple[bool, int]:
    """Checks shared by both endpoints; returns whether the client asked for a stream, and `n`."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    n = 1
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
        if key == "n":
            n = value
        elif value > 1:
            raise InvalidRequest(
                "'best_of' > 1 is not supported by the PD proxy: prefill hands over one sequence's KV cache; "
                "use n instead",
                param=key,
            )
    return bool(stream), n


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _check_prompt(body: dict[str, Any]) -> int:
    """The number of prompts: 1 for one prompt (a string, token ids, or a batch of one), else the batch's."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return 1
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        return len(prompt)  # a batch: strings or token-id lists, as vLLM takes them
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise InvalidRequest("each prompt of a batch must be a string or a non-empty list of token ids",
                             param="prompt")
    raise InvalidRequest("'prompt' must be a string, a non-empty list of token ids, or a list of those",
                         param="prompt")


def _check_messages(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of message objects", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{index}] must be an object with a string 'role'",
                                 param=f"messages[{index}]")
    return 1
