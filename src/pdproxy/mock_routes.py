"""The mock engine's routes beyond generation: pooling (embeddings, score, rerank, pooling), tokenizer,
the Responses API (with its store) and Anthropic's Messages API, in vLLM's shapes.

The mock's tokenizer is its word model: one whitespace-separated word is one token. A word that is a
decimal number is that token id (as token-id prompts become words in `mock`), any other word gets an id
from its hash, remembered per engine so `/detokenize` gives the words back.

Standalone like `mock`: it imports nothing from pdproxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

EMBEDDING_DIM = 8
VOCAB_LIMIT = 65536  # words remembered for /detokenize
STORE_LIMIT = 1024  # stored Responses-API answers per engine
_WORD_ID_BASE = 1 << 20  # hashed word ids start above the ids a token-id prompt uses in tests


@dataclass(slots=True)
class ResponseRecord:
    """One stored Responses-API answer (vLLM keeps them in memory too, behind its store flag)."""

    payload: dict[str, Any]
    background: bool


@dataclass(slots=True)
class MockRoutesState:
    """Per-engine state of these routes."""

    vocab: dict[int, str] = field(default_factory=dict)
    responses: OrderedDict[str, ResponseRecord] = field(default_factory=OrderedDict)


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type_ = status, message, param, type_


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers)


def _error(exc: _Refused) -> web.Response:
    return _json({"error": {"message": exc.message, "type": exc.type_, "param": exc.param, "code": exc.status}},
                 exc.status)


def _unit_vector(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for `text`: the same input always embeds the same way."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i] - 127.5) / 127.5 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _similarity(a: str, b: str) -> float:
    """A score in [0, 1]: the share of b's words found in a (a stand-in for a cross-encoder)."""
    words_b = b.split()
    if not words_b:
        return 0.0
    words_a = set(a.split())
    return round(sum(w in words_a for w in words_b) / len(words_b), 6)


def _texts(value: Any, param: str) -> list[str]:
    """A string, a list of strings, a list of token ids or a list of such lists, as texts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [" ".join(map(str, value))]
        if all(isinstance(t, str) for t in value):
            return list(value)
        if all(isinstance(t, list) for t in value):
            return [" ".join(map(str, t)) for t in value]
    raise _Refused(400, f"`{param}` must be a string, a list of strings or of token ids.", param)


def _object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise _Refused(400, "Request body must be a JSON object.")
    return body


Handler = Callable[[web.Request, dict[str, Any]], Any]


class MockRoutes:
    """The extra routes of one mock engine. `model`, `tokens` and `max_model_len` come from its config;
    `before(request, body)` is the engine's hook (record the request, apply a scripted fault: a response
    to send instead, or None)."""

    def __init__(self, *, model: Callable[[], str], tokens: Callable[[], int], max_model_len: int,
                 before: Callable[[web.Request, Any], Any], gate: asyncio.Event | None = None) -> None:
        """`gate`: while cleared, streams pause after their first token (the engine's hold())."""
        self._gate = gate
        self._model = model
        self._tokens = tokens
        self._max_model_len = max_model_len
        self._before = before
        self.state = MockRoutesState()

    def add_to(self, app: web.Application) -> None:
        post = {
            "/v1/embeddings": self._embeddings, "/pooling": self._pooling, "/v1/score": self._score,
            "/score": self._score, "/v1/rerank": self._rerank, "/rerank": self._rerank, "/v2/rerank": self._rerank,
            "/tokenize": self._tokenize, "/detokenize": self._detokenize, "/v1/responses": self._responses,
            "/v1/messages": self._messages,
        }
        for path, handler in post.items():
            app.router.add_post(path, self._wrap(handler))
        app.router.add_post("/v1/responses/{response_id}/cancel", self._wrap(self._cancel_response, body=False))
        app.router.add_get("/v1/responses/{response_id}", self._wrap(self._get_response, body=False))

    def _wrap(self, handler: Handler, *, body: bool = True) -> Callable[[web.Request], Any]:
        async def serve(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                parsed: Any = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = None
            instead = await self._before(request, parsed)
            if instead is not None:
                return instead  # type: ignore[no-any-return]
            try:
                return await handler(request, _object(raw) if body else {})  # type: ignore[no-any-return]
            except _Refused as exc:
                return _error(exc)

        return serve

    # -- tokenizer -----------------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        vocab = self.state.vocab
        for word in text.split():
            if word.isascii() and word.isdigit():
                ids.append(int(word))
                continue
            token = _WORD_ID_BASE + int.from_bytes(hashlib.sha256(word.encode()).digest()[:3], "big")
            if token not in vocab and len(vocab) < VOCAB_LIMIT:
                vocab[token] = word
            ids.append(token)
        return ids

    async def _tokenize(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        if isinstance(body.get("prompt"), str):
            text = body["prompt"]
        elif isinstance(body.get("messages"), list):
            text = " ".join(f"{m.get('role', '')} {m.get('content') or ''}" for m in body["messages"]
                            if isinstance(m, dict))
        else:
            raise _Refused(400, "Either `prompt` or `messages` is required.", "prompt")
        tokens = self.token_ids(text)
        return _json({"count": len(tokens), "max_model_len": self._max_model_len, "tokens": tokens,
                      "token_strs": None})

    async def _detokenize(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _Refused(400, "`tokens` must be a list of token ids.", "tokens")
        vocab = self.state.vocab
        return _json({"prompt": " ".join(vocab.get(t, str(t)) for t in tokens)})

    # -- pooling -------------------------------------------------------------------------
    def _usage(self, texts: list[str]) -> dict[str, int]:
        n = sum(len(t.split()) for t in texts)
        return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}

    async def _embeddings(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        texts = _texts(body.get("input"), "input")
        data = [{"index": i, "object": "embedding", "embedding": _unit_vector(t)} for i, t in enumerate(texts)]
        return _json({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(), "data": data, "usage": self._usage(texts)})

    async def _pooling(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        texts = _texts(body.get("input"), "input")
        data = [{"index": i, "object": "pooling", "data": _unit_vector(t)} for i, t in enumerate(texts)]
        return _json({"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(), "data": data, "usage": self._usage(texts)})

    async def _score(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        first = _texts(body.get("text_1"), "text_1")
        second = _texts(body.get("text_2"), "text_2")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise _Refused(400, "text_1 and text_2 must have the same length (or text_1 one item).", "text_1")
        data = [{"index": i, "object": "score", "score": _similarity(a, b)}
                for i, (a, b) in enumerate(zip(first, second, strict=True))]
        return _json({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": self._model(), "data": data, "usage": self._usage(first + second)})

    async def _rerank(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        query = body.get("query")
        if not isinstance(query, str):
            raise _Refused(400, "`query` must be a string.", "query")
        documents = _texts(body.get("documents"), "documents")
        top_n = body.get("top_n") or len(documents)
        results = sorted(({"index": i, "document": {"text": d}, "relevance_score": _similarity(d, query)}
                          for i, d in enumerate(documents)), key=lambda r: -r["relevance_score"])
        return _json({"id": f"rerank-{uuid.uuid4().hex}", "model": self._model(),
                      "usage": {"total_tokens": self._usage([query, *documents])["total_tokens"]},
                      "results": results[:top_n]})

    # -- Responses API -------------------------------------------------------------------
    def _response_payload(self, response_id: str, text: str, input_tokens: int, n: int, status: str) -> dict[str, Any]:
        output = [{"type": "message", "id": f"msg_{response_id[5:]}", "status": status, "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}]
        return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
                "model": self._model(), "output": output if status == "completed" else [],
                "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": input_tokens + n}}

    def _store(self, payload: dict[str, Any], background: bool) -> None:
        store = self.state.responses
        store[payload["id"]] = ResponseRecord(payload, background)
        while len(store) > STORE_LIMIT:
            store.popitem(last=False)

    async def _responses(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            prompt = raw_input
        elif isinstance(raw_input, list) and raw_input:
            prompt = " ".join(str(item.get("content", "")) if isinstance(item, dict) else str(item)
                              for item in raw_input)
        else:
            raise _Refused(400, "`input` must be a string or a non-empty list of input items.", "input")
        n = body.get("max_output_tokens") or self._tokens()
        if not isinstance(n, int) or n < 1:
            raise _Refused(400, "max_output_tokens must be at least 1.", "max_output_tokens")
        background = bool(body.get("background"))
        store = body.get("store", True) is not False
        if background and not store:
            raise _Refused(400, "background can only be used when `store` is true", "background")
        response_id = f"resp_{uuid.uuid4().hex}"
        text = "".join(f" tok{i}" for i in range(n))
        input_tokens = len(prompt.split())
        if background:  # queued: it stays in progress until a GET finds it done or it is cancelled
            payload = self._response_payload(response_id, text, input_tokens, n, "queued")
            self._store(payload, background=True)
            return _json(payload)
        payload = self._response_payload(response_id, text, input_tokens, n, "completed")
        if store:
            self._store(payload, background=False)
        if not body.get("stream"):
            return _json(payload)
        return await self._stream_response(request, payload, n)

    async def _stream_response(self, request: web.Request, payload: dict[str, Any], n: int) -> web.StreamResponse:
        """The Responses API's typed SSE events (`event:` and `data:` lines), as vLLM streams them."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        seq = 0
        item = payload["output"][0]
        in_progress = {**payload, "status": "in_progress", "output": []}

        async def event(kind: str, **fields: Any) -> None:
            nonlocal seq
            data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
            seq += 1
            await resp.write(b"event: %s\ndata: %s\n\n" % (kind.encode(), data))

        await event("response.created", response=in_progress)
        await event("response.in_progress", response=in_progress)
        await event("response.output_item.added", output_index=0,
                    item={**item, "status": "in_progress", "content": []})
        await event("response.content_part.added", output_index=0, content_index=0, item_id=item["id"],
                    part={"type": "output_text", "text": "", "annotations": []})
        for i in range(n):
            await event("response.output_text.delta", output_index=0, content_index=0, item_id=item["id"],
                        delta=f" tok{i}", logprobs=[])
            if i % 64 == 63:
                await asyncio.sleep(0)
        text = item["content"][0]["text"]
        await event("response.output_text.done", output_index=0, content_index=0, item_id=item["id"], text=text,
                    logprobs=[])
        await event("response.content_part.done", output_index=0, content_index=0, item_id=item["id"],
                    part=item["content"][0])
        await event("response.output_item.done", output_index=0, item=item)
        await event("response.completed", response=payload)
        await resp.write_eof()
        return resp

    def _stored(self, request: web.Request) -> ResponseRecord:
        response_id = request.match_info["response_id"]
        record = self.state.responses.get(response_id)
        if record is None:
            raise _Refused(404, f"Response with id '{response_id}' not found.", "response_id", "NotFoundError")
        return record

    async def _get_response(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        record = self._stored(request)
        if record.payload["status"] == "queued":  # a background response runs once asked about
            usage = record.payload["usage"]
            text = "".join(f" tok{i}" for i in range(usage["output_tokens"]))
            record.payload = self._response_payload(record.payload["id"], text, usage["input_tokens"],
                                                    usage["output_tokens"], "completed")
        return _json(record.payload)

    async def _cancel_response(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        record = self._stored(request)
        if not record.background:
            raise _Refused(400, "Cannot cancel a synchronous response.", "response_id")
        if record.payload["status"] == "queued":
            record.payload = {**record.payload, "status": "cancelled"}
        return _json(record.payload)

    # -- Anthropic Messages API ----------------------------------------------------------
    async def _messages(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Refused(400, "`messages` must be a non-empty list.", "messages")
        n = body.get("max_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _Refused(400, "`max_tokens` is required and must be at least 1.", "max_tokens")
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        message_id = f"msg_{uuid.uuid4().hex}"
        text = "".join(f" tok{i}" for i in range(n))
        usage = {"input_tokens": len(prompt.split()), "output_tokens": n}
        if not body.get("stream"):
            return _json({"id": message_id, "type": "message", "role": "assistant", "model": self._model(),
                          "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
                          "stop_sequence": None, "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        async def event(kind: str, **fields: Any) -> None:
            await resp.write(b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps({"type": kind, **fields})))

        await event("message_start", message={"id": message_id, "type": "message", "role": "assistant",
                                              "model": self._model(), "content": [], "stop_reason": None,
                                              "stop_sequence": None, "usage": {**usage, "output_tokens": 0}})
        await event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        for i in range(n):
            if i and self._gate is not None and not self._gate.is_set():
                await self._gate.wait()
            await event("content_block_delta", index=0, delta={"type": "text_delta", "text": f" tok{i}"})
        await event("content_block_stop", index=0)
        await event("message_delta", delta={"stop_reason": "max_tokens", "stop_sequence": None},
                    usage={"output_tokens": n})
        await event("message_stop")
        await resp.write_eof()
        return resp
