"""OpenAI-facing handlers: validate a request once, then hand it to the orchestrator."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from pdproxy.admin import authorize_request
from pdproxy.errors import Forbidden, InvalidRequest, LoopDetected, ProxyError, Unauthorized, Unavailable
from pdproxy.http.auth import PUBLIC_PATHS, ClientKeys
from pdproxy.http.limits import LARGE_BODY_BYTES
from pdproxy.http.parse_process import ParseProcess
from pdproxy.http.request import Request
from pdproxy.http.response import Response, json_response
from pdproxy.http.router import Handler, Router
from pdproxy.http.routes import PASSTHROUGH_ROUTES, RESPONSE_BY_ID, RESPONSE_CANCEL, RESPONSES
from pdproxy.http.validate import LoopGuard, loads_request, sanitize_request_id
from pdproxy.proxy.fanout import FanOut
from pdproxy.proxy.model_list import ModelList
from pdproxy.proxy.orchestrator import Orchestrator
from pdproxy.proxy.passthrough import Passthrough, Route
from pdproxy.proxy.record import RequestRecord
from pdproxy.proxy.response_homes import ResponseHomes
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Role, Upstream

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
GENERATE = "/inference/v1/generate"  # vLLM's tokens-in API: through PD, it carries kv_transfer_params
_FORWARDED_TRACE_HEADERS = ("traceparent", "tracestate")
# Client headers a pass-through route forwards besides the proxy's own (Anthropic clients version their API).
_FORWARDED_PASS_HEADERS = ("accept", "anthropic-version", "anthropic-beta")


class OpenAIApi:
    """The PD routes (`/v1/completions`, `/v1/chat/completions`, `/inference/v1/generate`), the pass-through
    routes (`PASSTHROUGH_ROUTES`, the Responses API by id) and `/health`."""

    def __init__(self, flow: Orchestrator, passthrough: Passthrough, *, upstream_api_key: str | None,
                 loop_guard: LoopGuard, fanout: FanOut, route_pools: Mapping[str, Role] | None = None,
                 homes: ResponseHomes | None = None, client_keys: ClientKeys | None = None,
                 model_list: ModelList | None = None, admin_token: str | None = None,
                 parser: ParseProcess | None = None) -> None:
        """`client_keys`: every route but `/health` needs one of them; the client's Authorization is then the
        proxy's to check, never forwarded (upstreams get `upstream_api_key` or nothing). `admin_token`:
        `/health?verbose=1` (the topology) is behind the admin API's rule: this bearer token when set, else
        loopback clients through no other proxy. `parser`: where bodies of LARGE_BODY_BYTES and more are parsed,
        off the loop (its owner stops it)."""
        self.flow = flow
        self.parser = parser if parser is not None else ParseProcess()
        self.passthrough = passthrough
        self._admin_token = admin_token.encode() if admin_token else None
        self.fanout = fanout
        self.loop_guard = loop_guard
        self.route_pools = dict(route_pools or {})
        self.homes = homes if homes is not None else ResponseHomes()
        self.client_keys = client_keys
        self.model_list = model_list  # /v1/models as the union of every model's, when several are served
        self._upstream_authorization = f"Bearer {upstream_api_key}" if upstream_api_key else None
        self._forward_authorization = client_keys is None
        # With tracing on, each leg carries its own span's traceparent instead of the client's.
        self._forwarded_trace_headers = () if flow.tracing.enabled else _FORWARDED_TRACE_HEADERS

    def add_routes(self, router: Router) -> None:
        def add(method: str, path: str, handler: Handler) -> None:
            if self.client_keys is not None and path not in PUBLIC_PATHS:
                handler = self.client_keys.guard(handler, self._refuser(path))
            router.add(method, path, handler)

        add("POST", COMPLETIONS, self.completions)
        add("POST", CHAT_COMPLETIONS, self.chat_completions)
        add("POST", GENERATE, self.generate)
        for method, path in PASSTHROUGH_ROUTES:
            # /v1/models is a metadata read (clients list it on start): never queued behind the load
            handler = self._pass_route(Route(path, self.route_pools.get(path, Role.DECODE), admitted=path != MODELS))
            add(method, path, self._models(handler) if path == MODELS and self.model_list is not None else handler)
        role = self.route_pools.get(RESPONSES, Role.DECODE)
        # A stored answer read, and a cancel (which frees capacity): neither waits for a slot.
        add("GET", RESPONSE_BY_ID, self._by_response_id(Route(RESPONSE_BY_ID, role, admitted=False)))
        add("POST", RESPONSE_CANCEL, self._by_response_id(Route(RESPONSE_CANCEL, role, admitted=False)))
        add("GET", "/health", self.health)

    def _refuser(self, endpoint: str) -> Callable[[Request, ProxyError], Response]:
        def refuse(request: Request, error: ProxyError) -> Response:
            return self.flow.refuse(request, endpoint, _request_id(request), error)

        return refuse

    async def completions(self, request: Request) -> Response | None:
        return await self._proxy(request, COMPLETIONS, _check_prompt)

    async def chat_completions(self, request: Request) -> Response | None:
        return await self._proxy(request, CHAT_COMPLETIONS, _check_messages)

    async def generate(self, request: Request) -> Response | None:
        return await self._proxy(request, GENERATE, _check_token_ids)

    async def _proxy(self, request: Request, endpoint: str, check: Callable[[dict[str, Any]], int]) -> Response | None:
        request_id = _request_id(request)
        try:
            self._check_loop(request)
            raw, request.body = request.body, b""  # parsed once: the raw bytes are not held for the whole stream
            if len(raw) >= LARGE_BODY_BYTES:  # off the loop: a 90 MB parse would stall every other client
                body = json_object(await self.parser.parse(raw))
            else:
                body = parse_json_object(raw)
            del raw
            prompts = check(body)
            stream, n = _check_common(body)
            # a batch or several samples: one PD flow each (proxy/fanout.py); generate's n is in its sampling_params
            fan_out = prompts * n > 1 and endpoint != GENERATE
            if fan_out:
                self.fanout.check(prompts, n)
        except ProxyError as exc:
            return self.flow.refuse(request, endpoint, request_id, exc)
        preq = ProxyRequest(endpoint, body, stream, request_id, self._upstream_headers(request, request_id))
        if fan_out:
            return await self.fanout.handle(request, preq, prompts, n)
        return await self.flow.handle(request, preq)

    # -- pass-through ------------------------------------------------------------------------

    def _pass_route(self, route: Route) -> Handler:
        learn = self._learn_home if route.label == RESPONSES else None

        async def handler(request: Request) -> Response | None:
            request_id = _request_id(request)
            models = self.flow.models
            try:
                self._check_loop(request)
                # Several models: the body's `model` picks the pools (a parse only then; one model, none).
                pools = None if models.single is not None else models.resolve(_body_model(request.body))
            except ProxyError as exc:
                return self.flow.refuse(request, route.label, request_id, exc)
            headers = self._pass_headers(request, request_id)
            return await self.passthrough.handle(request, route, _target(request), headers, request_id,
                                                 on_answer=learn, pools=pools)

        return handler

    def _models(self, pass_through: Handler) -> Handler:
        """`GET /v1/models`: passed through with one model, the union of every model's with several."""
        model_list = self.model_list
        assert model_list is not None

        async def handler(request: Request) -> Response | None:
            if not model_list.active:
                return await pass_through(request)
            request_id = _request_id(request)
            record = RequestRecord(request_id, MODELS, time.perf_counter(), request.remote or "-", stage="upstream")
            self.flow.enter()
            try:
                self._check_loop(request)
                response = await model_list.union(self._pass_headers(request, request_id), request_id)
            except ProxyError as exc:
                response = exc.response(request_id)
                record.error = exc.message
            finally:
                self.flow.leave()
            record.status = response.status
            self.flow.account(record)
            return response

        return handler

    def _by_response_id(self, route: Route) -> Handler:
        """GET / cancel of a Responses-API answer: to the server that created it; an id this process does not
        know is asked around the pool (first answer that is not a 404 wins, and is remembered)."""

        async def handler(request: Request) -> Response | None:
            request_id = _request_id(request)
            pool = self.passthrough.pools[route.role]
            url = self.homes.home(request.match_info["response_id"])
            home = pool.find(url) if url is not None else None
            try:
                self._check_loop(request)
                targets: list[Upstream] = [home] if home is not None else list(pool.routable())
                if not targets:
                    raise Unavailable(f"no routable {route.role.value} upstream", side=route.role.value)
            except ProxyError as exc:
                return self.flow.refuse(request, route.label, request_id, exc)
            headers = self._pass_headers(request, request_id)
            return await self.passthrough.handle(request, route, _target(request), headers, request_id,
                                                 targets=targets, next_on_404=home is None, on_answer=self._learn_home)

        return handler

    def _learn_home(self, upstream: Upstream, answer_start: bytes) -> None:
        self.homes.learn(upstream.url, answer_start)

    def _pass_headers(self, request: Request, request_id: str) -> bytes:
        """The proxy's header lines plus the client's Content-Type and the few headers a pass-through keeps."""
        extra = [(name, request.headers.get(name)) for name in ("content-type", *_FORWARDED_PASS_HEADERS)]
        lines = "".join(f"{name}: {value}\r\n" for name, value in extra if value)
        return self._upstream_headers(request, request_id, json=False) + lines.encode("latin-1", "replace")

    async def health(self, request: Request) -> Response:
        """200 when at least one P and one D are routable and the proxy is not draining, else 503 with
        the reason. `?verbose=1` lists every upstream, for admin callers only (401/403 otherwise)."""
        verbose = request.query().get("verbose", "0") not in ("0", "false", "")
        if verbose:
            try:
                authorize_request(request, self._admin_token)
            except (Unauthorized, Forbidden) as exc:
                return exc.response()
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
        if flow.models.single is None:  # several models: each one's own counts
            body["models"] = flow.models.describe()
        if verbose:
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
        authorization = self._upstream_authorization or (
            request.headers.get("authorization") if self._forward_authorization else None)
        if authorization:
            lines.append(f"Authorization: {authorization}\r\n")
        for name in self._forwarded_trace_headers:
            value = request.headers.get(name)
            if value:
                lines.append(f"{name}: {value}\r\n")
        return "".join(lines).encode("latin-1", "replace")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    return json_object(loads_request(raw))


def json_object(body: Any) -> dict[str, Any]:
    """A parsed body that must be a JSON object, or a 400."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _body_model(raw: bytes) -> object:
    """A pass-through body's `model` (None when absent or when the body is no JSON object: the engine judges)."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    return body.get("model") if isinstance(body, dict) else None


def _request_id(request: Request) -> str:
    """The client's X-Request-Id when it is fit for a log line, else a fresh unique one."""
    return sanitize_request_id(request.headers.get("x-request-id")) or os.urandom(16).hex()


def _target(request: Request) -> str:
    """The request target as the client sent it (percent-encoding and query string kept)."""
    return f"{request.raw_path}?{request.query_string}" if request.query_string else request.raw_path


def _check_token_ids(body: dict[str, Any]) -> int:
    """`/inference/v1/generate`: token ids in, sampling parameters as an object (one sequence: n = 1)."""
    if not _is_token_ids(body.get("token_ids")):
        raise InvalidRequest("'token_ids' must be a non-empty list of token ids", param="token_ids")
    params = body.get("sampling_params")
    if not isinstance(params, dict):
        raise InvalidRequest("'sampling_params' is required and must be an object", param="sampling_params")
    n = params.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("sampling_params.n other than 1 is not supported by the PD proxy: prefill hands over "
                             "one sequence's KV cache", param="sampling_params.n")
    return 1


def _check_common(body: dict[str, Any]) -> tuple[bool, int]:
    """Checks shared by the PD endpoints; returns whether the client asked for a stream, and `n`."""
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
