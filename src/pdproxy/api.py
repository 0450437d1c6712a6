"""OpenAI-facing handlers: parse and validate a request once, then hand it to the flow."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from pdproxy.errors import InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError
from pdproxy.flow import CLIENT_CLOSED, PDFlow
from pdproxy.request import ProxyRequest

log = logging.getLogger("pdproxy")

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MAX_REQUEST_ID_LENGTH = 256
_FORWARDED_TRACE_HEADERS = ("traceparent", "tracestate")


class OpenAIApi:
    """`/v1/completions`, `/v1/chat/completions`, `/v1/models` and `/health`."""

    def __init__(self, flow: PDFlow, *, max_body_bytes: int, upstream_api_key: str | None) -> None:
        self.flow = flow
        self.max_body_bytes = max_body_bytes
        self._upstream_authorization = f"Bearer {upstream_api_key}" if upstream_api_key else None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(COMPLETIONS, self.completions)
        app.router.add_post(CHAT_COMPLETIONS, self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, COMPLETIONS, _check_prompt)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, CHAT_COMPLETIONS, _check_messages)

    async def _proxy(
        self, request: web.Request, endpoint: str, check: Callable[[dict[str, Any]], None]
    ) -> web.StreamResponse:
        request_id = _request_id(request)
        try:
            body = await self._read_json(request)
            check(body)
            stream = _check_common(body)
        except ProxyError as exc:
            return self.flow.refuse(request, endpoint, request_id, exc)
        preq = ProxyRequest(endpoint, body, stream, request_id, self._upstream_headers(request, request_id))
        return await self.flow.handle(request, preq)

    async def models(self, request: web.Request) -> web.StreamResponse:
        request_id = _request_id(request)
        try:
            response = await self.flow.fetch_models(self._upstream_headers(request, request_id), request_id)
        except ProxyError as exc:
            response = exc.response(request_id)
        self.flow.metrics.requests.labels("/v1/models", str(response.status)).inc()
        return response

    async def health(self, request: web.Request) -> web.Response:
        """200 when at least one P and one D are routable and the proxy is not draining, else 503 with
        the reason. `?verbose=1` lists every upstream."""
        flow = self.flow
        body: dict[str, Any] = {}
        problems = ["draining: pdproxy is shutting down"] if flow.draining else []
        for pool in (flow.prefill_pool, flow.decode_pool):
            routable = len(pool.routable())
            body[pool.role.value] = {"routable": routable, "total": len(pool.members)}
            if not routable:
                problems.append(f"no routable {pool.role.value} upstream")
        if request.query.get("verbose", "0") not in ("0", "false", ""):
            body["upstreams"] = [u.describe() for pool in (flow.prefill_pool, flow.decode_pool) for u in pool.members]
            body["in_flight"] = flow.in_flight
            body["queued"] = flow.admission.waiting
        if problems:
            return web.json_response({"status": "unavailable", "reason": "; ".join(problems), **body}, status=503,
                                     dumps=_dumps)
        return web.json_response({"status": "ok", **body}, dumps=_dumps)

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        limit = f"the request body is larger than the limit of {self.max_body_bytes} bytes"
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise PayloadTooLarge(limit)
        raw = await _read_body(request, self.max_body_bytes, limit)
        if not raw:
            raise InvalidRequest("the request body is empty; send a JSON object")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return body

    def _upstream_headers(self, request: web.Request, request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        authorization = self._upstream_authorization or request.headers.get("Authorization")
        if authorization:
            headers["Authorization"] = authorization
        for name in _FORWARDED_TRACE_HEADERS:
            value = request.headers.get(name)
            if value:
                headers[name] = value
        return headers


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _request_id(request: web.Request) -> str:
    """The client's X-Request-Id when it is sane, else a fresh unique one."""
    given = request.headers.get("X-Request-Id")
    if given and len(given) <= MAX_REQUEST_ID_LENGTH and given.isascii() and given.isprintable():
        return given
    return os.urandom(16).hex()


def _check_common(body: dict[str, Any]) -> bool:
    """Checks shared by both endpoints; returns whether the client asked for a stream."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"'{key}' must be a positive integer", param=key)
        if value > 1:
            raise InvalidRequest(
                f"'{key}' > 1 is not supported by the PD proxy: prefill hands over one sequence's KV cache; "
                "send separate requests instead",
                param=key,
            )
    return bool(stream)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _check_prompt(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        return
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise InvalidRequest(
            "a list of prompts (batched completion) is not supported by the PD proxy; send one prompt per request",
            param="prompt",
        )
    raise InvalidRequest("'prompt' must be a string or a non-empty list of token ids", param="prompt")


def _check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of message objects", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{index}] must be an object with a string 'role'",
                                 param=f"messages[{index}]")


async def _read_body(request: web.Request, max_bytes: int, too_large: str) -> bytes:
    """The raw body, not kept by the request as `request.read()` would keep it: with a long prompt
    that copy would stay for the whole stream."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn aiohttp's own HTTP errors (unknown route, wrong method, body too big) into OpenAI errors."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return NotFound(f"unknown route: {request.method} {request.path}").response()
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"method {request.method} is not allowed on {request.path}; use {allowed}"
        response = MethodNotAllowed(message).response()
        response.headers["Allow"] = allowed
        return response
    except web.HTTPRequestEntityTooLarge:
        return PayloadTooLarge("the request body is too large").response()
    except web.HTTPException:
        raise
    except ConnectionResetError:  # the client left while we wrote to it (the flow counted it): send nothing
        return web.Response(status=CLIENT_CLOSED)
    except Exception:  # a bug: say so in the log with its traceback, and in OpenAI's shape to the client
        log.exception("internal error on %s %s", request.method, request.path)
        return ProxyError("internal error in pdproxy; its log has the details").response()
