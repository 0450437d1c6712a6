"""A mock vLLM OpenAI-compatible engine for the demo, the tests and the benchmarks.

It speaks just enough of vLLM's HTTP surface (``/v1/completions``,
``/v1/chat/completions``, ``/health``, ``/v1/models``) and of the NIXL
``kv_transfer_params`` handshake that a PD proxy can be exercised end to end
without GPUs: a prefill engine hands out a handle whose block ids are a pure
function of the prompt, so a decode engine can check it without shared state.
Scripted faults (fail, hang, garbage, drop, die/stall mid-stream) let tests
drive the proxy's failure paths deterministically.

With ``kv_events`` on, the prefix-cache model publishes vLLM-format KV-cache events over ZMQ
(``mock_kv_events``) and ``/kv_event_sources`` says where, as vLLM does.

``protocol`` picks the PD protocol it speaks (``vllm``, ``omni``, ``sglang``, ``mooncake``;
see ``mock_pd.py`` for the two whose KV moves through P's bootstrap server).

Standalone on purpose: it imports nothing from ``pdproxy`` but its own ``mock_pd`` and ``mock_kv_events``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

if TYPE_CHECKING:
    from pdproxy.mock_kv_events import KvEventPublisher
from pdproxy.mock_pd import BOOTSTRAPPED, PROTOCOLS, BootstrapServer, KvBoard, fetch_kv, sglang_target
from pdproxy.mock_routes import MockRoutes

__all__ = [
    "BLOCK_SIZE",
    "MAX_MODEL_LEN",
    "MockConfig",
    "MockEngine",
    "MockStats",
    "PrefixCache",
    "RecordedRequest",
    "block_ids_for",
    "serve_mock",
    "start_mock",
]

log = logging.getLogger(__name__)

#: Prompt words per KV block; one remote block id is handed out per block.
BLOCK_SIZE = 16
#: Context window advertised by /v1/models and enforced like vLLM (prompt + completion).
MAX_MODEL_LEN = 8192
MAX_BODY_BYTES = 256 * 1024 * 1024  # vLLM (FastAPI) caps no request body; aiohttp's default would be 1 MiB

_ROLES = ("prefill", "decode", "both")
_HANDLE_FIELDS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids")
_OMNI_HANDLE_FIELDS = ("remote_block_ids", "remote_cluster_id", "remote_host_ip")
_GARBAGE = b"this is not json{"
_DONE = b"data: [DONE]\n\n"
_ROLE_DELTA = b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
_OUT_TOKEN_BASE = 100  # /inference/v1/generate: token i of an answer is this + i
_YIELD_EVERY = 64  # with no inter-token delay, give the loop a turn this often


@dataclass(slots=True)
class MockConfig:
    """How one mock engine behaves; fields are read per request, so tests may tweak them live."""

    role: str = "both"  # "prefill" | "decode" | "both"
    ttft_ms: float = 0.0  # delay before the first token (for a prefill request: before answering)
    itl_ms: float = 0.0  # delay between streamed tokens
    tokens: int = 16  # tokens generated when the request sets neither max_tokens nor max_completion_tokens
    model: str = "mock"
    engine_id: str = ""  # "" -> a fresh uuid4 hex when the engine is built
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 5600
    # Prefix cache model: an LRU of BLOCK_SIZE-token blocks; prompt tokens it holds are not computed again.
    cache_blocks: int = 4096  # blocks the engine's prefix cache holds; 0: no cache
    # Prefill compute: this many ms per uncached prompt token, one prompt at a time (FIFO), before
    # ttft_ms. 0 (the default) adds no delay, so timing is ttft_ms alone.
    prefill_ms_per_token: float = 0.0
    # KV-cache events (vLLM's --kv-events-config): published from the prefix-cache model over ZMQ.
    kv_events: bool = False
    kv_events_port: int = 0  # 0: a free port; give the old one to stand in for an engine restarted in place
    kv_events_replay_port: int = 0  # the same, for the replay socket
    kv_events_replay: bool = True  # False: no replay socket (a subscriber that misses a batch cannot catch up)
    protocol: str = "vllm"  # "vllm" | "omni" | "sglang" | "mooncake" | "nixl-push"
    bootstrap_port: int = 0  # sglang/mooncake/nixl-push P: its bootstrap server's port (0: the OS picks one)
    kv_timeout_ms: float = 2000.0  # how long P and D wait for each other (SGLang 300 s, Mooncake 480 s)
    dp_size: int = 1  # mooncake P: DP ranks it announces on /query (one engine id each)
    eos_after: int = 0  # non-streamed answers stop (finish_reason "stop") after this many tokens; 0: never
    prompt_tokens_details: bool = True  # vLLM's --enable-prompt-tokens-details: usage reports cached tokens
    # Tokens tagged with a digest of (prompt, seed): " <tag>:tok0 <tag>:tok1 ...", so answers to different prompts
    # (or seeds) differ and a merged batch can be checked choice by choice. Off: " tok0 tok1 ..." for every prompt.
    distinct_text: bool = False

    def __post_init__(self) -> None:
        """Reject nonsense early, so a typo in a demo config fails at start-up."""
        if self.role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {self.role!r}")
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError("ttft_ms and itl_ms must be >= 0")
        if self.cache_blocks < 0 or self.prefill_ms_per_token < 0:
            raise ValueError("cache_blocks and prefill_ms_per_token must be >= 0")
        if self.tokens < 1:
            raise ValueError("tokens must be >= 1")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 0 <= self.bootstrap_port < 65536 or self.kv_timeout_ms <= 0 or self.dp_size < 1 or self.eos_after < 0:
            raise ValueError("bootstrap_port must be 0-65535, kv_timeout_ms > 0, dp_size >= 1, eos_after >= 0")


@dataclass(slots=True)
class RecordedRequest:
    """One generation request as the engine received it, for assertions in tests.

    ``headers`` keeps the original header-name case (a plain dict copy of
    aiohttp's headers); use :meth:`header` for a case-insensitive lookup.
    ``body`` is ``{}`` when the body was not a JSON object.
    """

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    def header(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive header lookup, because clients and proxies vary the case."""
        lname = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lname:
                return value
        return default


@dataclass(slots=True)
class MockStats:
    """Counters a test or benchmark reads to see what the proxy actually did."""

    prefills: int = 0  # requests with kv_transfer_params.do_remote_decode == true
    decodes: int = 0  # generation requests without do_remote_decode
    decodes_with_valid_handle: int = 0
    decodes_with_invalid_handle: int = 0
    decodes_without_handle: int = 0
    in_flight: int = 0  # generation requests currently being served
    completed: int = 0
    aborted: int = 0  # generations cancelled or whose client went away mid-response
    # Prefix cache, over every request that computes its prompt (all but decodes with a valid handle).
    # Measurements, not outcomes: left out of ==, so comparing outcome counters stays exact.
    prompt_tokens_hit: int = dataclasses.field(default=0, compare=False)  # found in the prefix cache
    prompt_tokens_miss: int = dataclasses.field(default=0, compare=False)  # computed
    kv_fetches: int = 0  # sglang/mooncake P: KV fetches from decode engines that reached its bootstrap server


@dataclass(slots=True, frozen=True)
class _Fault:
    """One scripted misbehaviour, consumed by the next generation request."""

    kind: str  # "fail" | "hang" | "garbage" | "drop" | "die" | "stall" | "kv_lost"
    status: int = 500
    body: bytes | None = None
    n_chunks: int = 0


@dataclass(slots=True)
class _Gen:
    """A validated generation request."""

    chat: bool
    request_id: str
    prompt_text: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    kv: dict[str, Any] | None
    generate: bool = False  # /inference/v1/generate: token ids in and out
    cached_tokens: int = 0  # prompt tokens not computed here: prefix-cache hits, or all of a transferred prompt
    seed: Any = None
    echo: bool = False  # completions: the prompt's text before the generated text
    logprobs: int | None = None  # completions, non-streamed: a deterministic logprobs object

    def word_prefix(self, distinct: bool) -> str:
        """What precedes `tok<i>` in each generated token."""
        if not distinct:
            return ""
        return hashlib.sha256(f"{self.prompt_text}\0{self.seed}".encode()).hexdigest()[:6] + ":"


class _BadRequest(Exception):
    """Raised by validation; turned into a vLLM-style 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def block_ids_for(prompt_text: str) -> list[int]:
    """Remote block ids for a prompt: deterministic, so P and D agree without shared state.

    One id per started block of ``BLOCK_SIZE`` whitespace-separated words (at
    least one), each derived from sha256(prompt) and the block index.
    """
    digest = hashlib.sha256(prompt_text.encode()).digest()
    n_blocks = max(1, -(-len(prompt_text.split()) // BLOCK_SIZE))
    return [
        int.from_bytes(hashlib.sha256(digest + i.to_bytes(4, "big")).digest()[:4], "big") & 0x7FFFFFFF
        for i in range(n_blocks)
    ]


class PrefixCache:
    """A bounded LRU of prompt blocks, as vLLM's automatic prefix caching keeps them.

    A block is ``BLOCK_SIZE`` tokens (here: words); its key chains the previous key with the
    block's words, so it stands for the whole prefix up to it. Only whole blocks are cached, and
    at least the last prompt token is always computed. A prompt's blocks are touched from its end
    to its start, so eviction removes the ends of prompts first and what is held stays a prefix.
    """

    __slots__ = ("_blocks", "events")

    def __init__(self) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.events: KvEventPublisher | None = None  # told of every block stored, evicted or cleared

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup_and_insert(self, words: list[str], capacity: int) -> int:
        """Tokens of ``words`` already cached; then cache all its whole blocks (bounded by ``capacity``)."""
        if capacity <= 0:
            if self._blocks and self.events is not None:
                self.events.cleared()
            self._blocks.clear()
            return 0
        keys: list[int] = []
        key = 0
        for end in range(BLOCK_SIZE, len(words) + 1, BLOCK_SIZE):
            key = hash((key, *words[end - BLOCK_SIZE:end]))
            keys.append(key)
        blocks = self._blocks
        hit = 0
        for key in keys:
            if key not in blocks:
                break
            hit += 1
        for key in reversed(keys):
            if key in blocks:
                blocks.move_to_end(key)
            else:
                blocks[key] = None
        evicted = [blocks.popitem(last=False)[0] for _ in range(len(blocks) - capacity)]
        if self.events is not None:
            if hit < len(keys):  # what is held is a prefix: the new blocks are the rest, one chain
                self.events.stored(keys[hit:], keys[hit - 1] if hit else None,
                                   words[hit * BLOCK_SIZE:len(keys) * BLOCK_SIZE], BLOCK_SIZE)
            if evicted:
                self.events.removed(evicted)
        return min(hit * BLOCK_SIZE, max(len(words) - 1, 0))


def _error_response(
    status: int, message: str, type_: str = "BadRequestError", param: str | None = None
) -> web.Response:
    """OpenAI/vLLM error JSON, so proxies exercise their real error parsing."""
    payload = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_prompt(body: dict[str, Any]) -> str:
    """Completions prompt -> text (token ids become space-separated words, one per id)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return " ".join(map(str, prompt))
    raise _BadRequest("`prompt` must be a string or a non-empty list of token ids.", "prompt")


def _mock_logprobs(gen: _Gen, words: list[str]) -> dict[str, Any]:
    """vLLM's completions logprobs shape with made-up values that depend only on each token's text
    (and, with echo, the prompt's words first, the first one without a logprob, as vLLM answers)."""
    tokens = ([f" {w}" for w in gen.prompt_text.split()] if gen.echo else []) + words
    values: list[float | None] = [-round((sum(t.encode()) % 97) / 10, 1) for t in tokens]
    if gen.echo and values:
        values[0] = None
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": [None if v is None else {t: v} for t, v in zip(tokens, values, strict=True)],
        "text_offset": offsets,
    }


def _parse_messages(body: dict[str, Any]) -> str:
    """Chat messages -> rendered text (role and content of every message)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("`messages` must be a non-empty list.", "messages")
    parts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _BadRequest("Each message must be an object with a string `role`.", "messages")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            text = content or ""
        elif isinstance(content, list):
            texts: list[str] = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _BadRequest("Only text content parts are supported by the mock.", "messages")
                texts.append(part["text"])
            text = " ".join(texts)
        else:
            raise _BadRequest("Message `content` must be a string or a list of text parts.", "messages")
        parts.append(f"{msg['role']} {text}")
    return " ".join(parts)


def _generate_as_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A `/inference/v1/generate` body (token_ids, sampling_params) as the completion it stands for."""
    token_ids = body.get("token_ids")
    if not isinstance(token_ids, list) or not token_ids or not all(_is_int(t) for t in token_ids):
        raise _BadRequest("`token_ids` must be a non-empty list of token ids.", "token_ids")
    params = body.get("sampling_params")
    if not isinstance(params, dict):
        raise _BadRequest("`sampling_params` is required and must be an object.", "sampling_params")
    completion = {key: body[key] for key in ("stream", "stream_options", "kv_transfer_params") if key in body}
    completion.update({key: params[key] for key in ("max_tokens", "min_tokens") if key in params})
    completion["prompt"] = token_ids
    return completion


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _BadRequest(f"{key} must be at least 1, got {value}.", key)
    return int(value)


class MockEngine:
    """A mock vLLM engine: one aiohttp app, counters, a request log and a fault script.

    Not thread-safe; use it from the event loop that serves it.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        config = config if config is not None else MockConfig()
        if not config.engine_id:
            # A copy, so one MockConfig can seed several engines with distinct ids.
            config = dataclasses.replace(config, engine_id=uuid.uuid4().hex)
        self.config: MockConfig = config
        self.stats: MockStats = MockStats()
        self.requests: list[RecordedRequest] = []
        self.created: int = int(time.time())
        self._faults: deque[_Fault] = deque()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.healthy = True  # False: /health answers 503 (as an engine still loading or failing would)
        self._gate = asyncio.Event()  # cleared by hold(): streams pause after their first token
        self._gate.set()
        self._answering = asyncio.Event()  # cleared by stop_answering(): generations wait, unanswered
        self._answering.set()
        self.health_probes = 0
        self.prefix_cache = PrefixCache()
        self._compute_free_at = 0.0  # loop time when the prompt computed last is done (FIFO compute)
        self._compute_starts: deque[float] = deque()  # loop times prompts queued for compute start at
        self.kv_board = KvBoard()  # sglang/mooncake P: rooms / transfer ids waiting for their D
        self.bootstrap: BootstrapServer | None = None  # started with the app when this P needs one
        self.bind_host = "127.0.0.1"  # where the bootstrap server listens (start_mock sets it)
        self._session: aiohttp.ClientSession | None = None  # D's KV fetches from P's bootstrap server
        self._kv_timers: dict[str, asyncio.TimerHandle] = {}  # P: when published KV is given up
        self.routes = MockRoutes(model=lambda: self.config.model, tokens=lambda: self.config.tokens,
                                 max_model_len=MAX_MODEL_LEN, before=self._before_route, gate=self._gate)

    @property
    def bootstrap_port(self) -> int | None:
        """The port of this P's bootstrap server once it runs (None when it has none)."""
        return self.bootstrap.port if self.bootstrap is not None else None

    @property
    def engine_ids(self) -> list[str]:
        """The engine id of each DP rank (Mooncake's /query); rank 0's is the engine's own."""
        cfg = self.config
        return [cfg.engine_id] + [f"{cfg.engine_id}-dp{rank}" for rank in range(1, cfg.dp_size)]

    # ------------------------------------------------------------------ app

    def make_app(self) -> web.Application:
        """Build the aiohttp app; serve it with ``handler_cancellation=True`` to see disconnects.

        On app shutdown every generation still running is cancelled (and counted as aborted),
        so a hung or slow request never holds up ``runner.cleanup()``.
        """
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self._handle_completions)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/kv_event_sources", self._handle_kv_event_sources)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/get_server_info", self._handle_server_info)
        # The fault switch of a mock running in another process (benchmarks): POST stops answering, DELETE resumes.
        app.router.add_post("/mock/hang", self._handle_hang)
        app.router.add_delete("/mock/hang", self._handle_hang)
        app.router.add_post("/inference/v1/generate", self._handle_generate)
        self.routes.add_to(app)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        if self.config.kv_events:
            app.on_startup.append(self._start_kv_events)
            app.on_cleanup.append(self._stop_kv_events)
        return app

    async def _start_kv_events(self, _app: web.Application) -> None:
        from pdproxy.mock_kv_events import KvEventPublisher  # pyzmq only when events are on

        self.prefix_cache.events = KvEventPublisher(port=self.config.kv_events_port,
                                                    replay=self.config.kv_events_replay,
                                                    replay_port=self.config.kv_events_replay_port)

    async def _stop_kv_events(self, _app: web.Application) -> None:
        publisher, self.prefix_cache.events = self.prefix_cache.events, None
        if publisher is not None:
            await publisher.close()

    @property
    def kv_events(self) -> KvEventPublisher | None:
        """The KV-event publisher while the engine serves with ``kv_events`` on (for tests)."""
        return self.prefix_cache.events

    async def _handle_metrics(self, _request: web.Request) -> web.Response:
        """vLLM's scheduler gauges: requests running and waiting (prompt compute not started), KV usage."""
        now = asyncio.get_running_loop().time()
        starts = self._compute_starts
        while starts and starts[0] <= now:
            starts.popleft()
        waiting = min(len(starts), self.stats.in_flight)
        usage = len(self.prefix_cache) / self.config.cache_blocks if self.config.cache_blocks else 0.0
        labels = f'engine="0",model_name="{self.config.model}"'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(self.stats.in_flight - waiting)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} {float(waiting)}\n"
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} {usage}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def _handle_kv_event_sources(self, _request: web.Request) -> web.Response:
        events = self.prefix_cache.events
        return web.Response(body=orjson.dumps(events.sources() if events is not None else {}),
                            content_type="application/json")

    async def _on_startup(self, _app: web.Application) -> None:
        cfg = self.config
        if cfg.role == "prefill" and cfg.protocol in BOOTSTRAPPED:
            worker = f"tcp://{cfg.side_channel_host}:{cfg.side_channel_port}"
            self.bootstrap = BootstrapServer(self.kv_board, self.engine_ids, worker, cfg.kv_timeout_ms / 1000.0,
                                             self._count_kv_fetch)
            await self.bootstrap.start(self.bind_host, cfg.bootstrap_port)

    def _expire_kv(self, key: str) -> None:
        self._kv_timers.pop(key, None)
        self.kv_board.abort(key)

    def _count_kv_fetch(self) -> None:
        self.stats.kv_fetches += 1
        self._notify()

    async def _on_cleanup(self, _app: web.Application) -> None:
        for timer in self._kv_timers.values():
            timer.cancel()
        self._kv_timers.clear()
        if self.bootstrap is not None:
            await self.bootstrap.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _on_shutdown(self, _app: web.Application) -> None:
        """Cancel hanging/stalled/slow generations so runner.cleanup() never waits on them."""
        for task in list(self._tasks):
            task.cancel()

    # --------------------------------------------------------------- faults

    def fail_next(self, status: int = 500, times: int = 1, body: bytes | None = None) -> None:
        """Answer the next ``times`` generation requests with ``status`` and an error JSON (or ``body``)."""
        self._script(_Fault("fail", status=status, body=body), times)

    def hang_next(self, times: int = 1) -> None:
        """Accept the next requests and never answer (until the client leaves or the server stops)."""
        self._script(_Fault("hang"), times)

    def garbage_next(self, times: int = 1) -> None:
        """Answer 200 application/json with a body that is not JSON."""
        self._script(_Fault("garbage"), times)

    def drop_next(self, times: int = 1) -> None:
        """Close the connection without sending any response."""
        self._script(_Fault("drop"), times)

    def die_after(self, n_chunks: int, times: int = 1) -> None:
        """Streaming: send ``n_chunks`` token chunks, then close the connection (no [DONE]).

        A non-streaming request hit by this fault is dropped like :meth:`drop_next`.
        """
        self._script(_Fault("die", n_chunks=n_chunks), times)

    def stall_after(self, n_chunks: int, times: int = 1) -> None:
        """Streaming: send ``n_chunks`` token chunks, then hang forever.

        A non-streaming request hit by this fault hangs like :meth:`hang_next`.
        """
        self._script(_Fault("stall", n_chunks=n_chunks), times)

    def lose_kv_next(self, times: int = 1) -> None:
        """Fail the next requests as vLLM fails a decode whose KV could not be loaded.

        Streamed: 200 and a first SSE event ``{"error": ...}``; not streamed: 500.
        """
        self._script(_Fault("kv_lost"), times)

    def hold(self) -> None:
        """Pause every stream after its first token until `release()` (deterministic open streams)."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def stop_answering(self) -> None:
        """Hang every generation request from now on (a stuck engine: /health still answers) until
        `resume_answering()`; requests held meanwhile then go on as if nothing happened."""
        self._answering.clear()

    def resume_answering(self) -> None:
        self._answering.set()

    @property
    def answering(self) -> bool:
        return self._answering.is_set()

    @property
    def handlers_running(self) -> int:
        """Generation handlers running now, held and hung ones included (in_flight counts only generating)."""
        return len(self._tasks)

    def clear_faults(self) -> None:
        """Forget every scripted fault not yet consumed."""
        self._faults.clear()

    def _script(self, fault: _Fault, times: int) -> None:
        if times < 1:
            raise ValueError("times must be >= 1")
        if fault.n_chunks < 0:
            raise ValueError("n_chunks must be >= 0")
        self._faults.extend([fault] * times)

    # -------------------------------------------------------------- waiting

    async def wait_until(self, predicate: Callable[[MockStats], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate(stats)`` holds (re-checked on every stats change); else TimeoutError."""
        await self._wait(lambda: predicate(self.stats), timeout, "stats condition")

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        """Return once at least ``n`` generation requests were received; else TimeoutError."""
        await self._wait(lambda: len(self.requests) >= n, timeout, f"{n} requests")

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Return once no generation is in flight (e.g. after a client disconnect)."""
        await self._wait(lambda: self.stats.in_flight == 0, timeout, "in_flight == 0")

    async def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        if check():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (check, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:  # distinct from the builtin on Python 3.10
            raise TimeoutError(f"mock engine: timed out after {timeout}s waiting for {what}") from None
        finally:
            self._waiters.remove(entry)

    def _notify(self) -> None:
        """Wake waiters whose condition now holds; synchronous so it is safe in finally blocks."""
        for check, fut in self._waiters:
            if not fut.done() and check():
                fut.set_result(None)

    # ------------------------------------------------------------ handlers

    async def _handle_hang(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.stop_answering()
        else:
            self.resume_answering()
        return web.json_response({"answering": self.answering})

    async def _handle_health(self, _request: web.Request) -> web.Response:
        self.health_probes += 1
        return web.Response(status=200 if self.healthy else 503)

    async def _handle_models(self, _request: web.Request) -> web.Response:
        model = self.config.model
        payload = {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "pdproxy-mock",
                    "root": model,
                    "parent": None,
                    "max_model_len": MAX_MODEL_LEN,
                }
            ],
        }
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def _handle_server_info(self, _request: web.Request) -> web.Response:
        """SGLang's server args, flattened as its /get_server_info answers them (the part a proxy reads)."""
        cfg = self.config
        if cfg.protocol != "sglang":
            return _error_response(404, "Not Found", type_="NotFoundError")
        mode = {"prefill": "prefill", "decode": "decode"}.get(cfg.role, "null")
        port = self.bootstrap_port or cfg.bootstrap_port or 8998
        payload = {"model_path": cfg.model, "disaggregation_mode": mode, "disaggregation_bootstrap_port": port,
                   "disaggregation_transfer_backend": "mock", "tp_size": 1, "dp_size": 1}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def _handle_stats(self, _request: web.Request) -> web.Response:
        payload: dict[str, Any] = dataclasses.asdict(self.stats)
        payload["role"] = self.config.role
        payload["engine_id"] = self.config.engine_id
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def _handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generation(request, chat=False)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generation(request, chat=True)

    async def _handle_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generation(request, chat=False, generate=True)

    async def _handle_generation(self, request: web.Request, chat: bool, generate: bool = False) -> web.StreamResponse:
        """Record, apply a scripted fault, validate, role-check, then generate."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            return await self._generation(request, chat, generate)
        finally:
            if task is not None:
                self._tasks.discard(task)
                self._notify()  # a waiter may wait for this handler to end (held, hung or aborted)

    async def _before_route(self, request: web.Request, body: Any) -> web.StreamResponse | None:
        """The extra routes (mock_routes): recorded, and a scripted fault applies to them as to generation."""
        recorded = body if isinstance(body, dict) else {}
        self.requests.append(RecordedRequest(request.path, dict(request.headers), recorded))
        self._notify()
        fault = self._faults.popleft() if self._faults else None
        if fault is None:
            return None
        kind = {"die": "drop", "stall": "hang", "kv_lost": "fail"}.get(fault.kind, fault.kind)
        return await self._apply_fault(request, dataclasses.replace(fault, kind=kind))

    async def _generation(self, request: web.Request, chat: bool, generate: bool = False) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(
            RecordedRequest(request.path, dict(request.headers), body if isinstance(body, dict) else {})
        )
        self._notify()
        if not self._answering.is_set():  # stop_answering(): held until resumed, the client leaves or shutdown
            await self._answering.wait()

        fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind not in ("die", "stall", "kv_lost"):
            return await self._apply_fault(request, fault)

        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        try:
            if not isinstance(body, dict):
                raise _BadRequest("Request body must be a JSON object.")
            if generate:
                body = _generate_as_completion(body)
            gen = self._parse(body, chat, request_id)
            gen.generate = generate
            prefill = self._check_role(gen) if self.config.protocol == "vllm" else self.config.role == "prefill"
            kv_key = self._kv_key(body, gen, prefill, request)
        except _BadRequest as exc:
            return _error_response(400, exc.message, param=exc.param)

        if fault is not None and fault.kind == "kv_lost":
            return await self._kv_lost(request, gen.stream)
        if fault is not None and not gen.stream:
            # die/stall only make sense mid-stream; for a plain response they drop/hang.
            return await self._apply_fault(request, _Fault("drop" if fault.kind == "die" else "hang"))

        stats = self.stats
        stats.in_flight += 1
        self._notify()
        try:
            computes_prompt = True  # unless the KV arrives from a prefill engine
            if prefill:
                stats.prefills += 1
            elif self.config.protocol in BOOTSTRAPPED:
                stats.decodes += 1
                # D waits here for P's KV (bounded by kv_timeout_ms): the heart of the concurrent protocols.
                fetched = await self._fetch_kv(kv_key) if kv_key is not None else None
                if isinstance(fetched, str):  # the KV never came: fail as the engines' load-failure policy does
                    stats.decodes_with_invalid_handle += 1
                    return _error_response(500, f"KV transfer failed: {fetched}", type_="InternalServerError")
                if fetched is None:
                    stats.decodes_without_handle += 1
                elif self._fetched_kv_is_valid(fetched, gen, kv_key):
                    stats.decodes_with_valid_handle += 1
                    computes_prompt = False
                    gen.cached_tokens = gen.prompt_tokens
                else:
                    stats.decodes_with_invalid_handle += 1
            else:
                stats.decodes += 1
                kv = gen.kv
                if kv is None or (self.config.protocol == "vllm" and not kv.get("do_remote_prefill")):
                    stats.decodes_without_handle += 1
                elif self._handle_is_valid(kv, gen, request, self.config.protocol):
                    stats.decodes_with_valid_handle += 1
                    computes_prompt = False
                    gen.cached_tokens = gen.prompt_tokens
                else:
                    stats.decodes_with_invalid_handle += 1
            self._notify()
            if computes_prompt:
                t0 = self._compute_prompt(gen, t0)
            if prefill and kv_key is not None:
                failed = await self._hand_over(kv_key, gen, t0)
                if failed is not None:
                    return failed
            if gen.stream:
                if prefill:  # only SGLang's P streams: it makes the first token only, D the rest
                    gen = dataclasses.replace(gen, max_tokens=1)
                return await self._stream(request, gen, fault, t0)
            return await self._complete(gen, prefill, t0)
        except asyncio.CancelledError:
            stats.aborted += 1
            raise
        finally:
            stats.in_flight -= 1
            self._notify()

    # ------------------------------------------------- PD protocols (mock_pd)

    def _kv_key(self, body: dict[str, Any], gen: _Gen, prefill: bool, request: web.Request) -> tuple[str, str] | None:
        """(P's bootstrap base URL, room or transfer id) of a bootstrapped request; None otherwise.

        Raises _BadRequest for fields the real engine would reject."""
        cfg = self.config
        if cfg.protocol == "sglang" and cfg.role != "both":
            target = sglang_target(body, cfg.bootstrap_port or 8998)
            if isinstance(target, str):
                raise _BadRequest(target, "bootstrap_room")
            return target
        if cfg.protocol not in ("mooncake", "nixl-push") or cfg.role == "both":
            return None
        kv = gen.kv or {}
        if cfg.protocol == "nixl-push":
            return self._push_key(kv, prefill, request)
        if prefill:
            if not kv.get("do_remote_decode"):
                raise _BadRequest("A Mooncake prefill request needs kv_transfer_params.do_remote_decode.",
                                  "kv_transfer_params")
            rank = request.headers.get("X-data-parallel-rank", "0")
            if not rank.isdigit() or int(rank) >= cfg.dp_size:
                raise _BadRequest(f"X-data-parallel-rank {rank!r} is not a DP rank of this engine "
                                  f"(0-{cfg.dp_size - 1}).")
            transfer_id = kv.get("transfer_id")
            # Without a transfer_id vLLM logs "Missing transfer_id" and holds no KV: nobody can fetch it.
            return ("", f"{rank}/{transfer_id}") if isinstance(transfer_id, str) and transfer_id else None
        if not kv.get("do_remote_prefill"):
            return None
        addr, engine_id, transfer_id = (kv.get(k) for k in ("remote_bootstrap_addr", "remote_engine_id", "transfer_id"))
        if not all(isinstance(v, str) and v for v in (addr, engine_id, transfer_id)):
            return None  # vLLM: "Got invalid KVTransferParams", and D recomputes
        return str(addr).rstrip("/"), f"{engine_id}/{transfer_id}"

    def _push_key(self, kv: dict[str, Any], prefill: bool, request: web.Request) -> tuple[str, str] | None:
        """NIXL push: P's KV is found by (P's engine id, request id); D is told where P is."""
        request_id = request.headers.get("X-Request-Id", "")
        if prefill:
            if not kv.get("do_remote_decode"):
                raise _BadRequest("A NIXL prefill request needs kv_transfer_params.do_remote_decode.",
                                  "kv_transfer_params")
            return "", f"{self.config.engine_id}/{request_id}"
        if not kv.get("do_remote_prefill"):
            return None
        missing = [k for k in ("remote_engine_id", "remote_host", "remote_port", "tp_size") if kv.get(k) is None]
        if missing:  # vLLM's push scheduler indexes these: a request without them cannot be served
            raise _BadRequest(f"kv_transfer_params lacks {', '.join(missing)}.", "kv_transfer_params")
        return f"http://{kv['remote_host']}:{kv['remote_port']}", f"{kv['remote_engine_id']}/{request_id}"

    def _kv_for(self, gen: _Gen, rank: int) -> dict[str, Any]:
        return {"engine_id": self.engine_ids[rank], "block_ids": block_ids_for(gen.prompt_text)}

    async def _hand_over(self, kv_key: tuple[str, str], gen: _Gen, t0: float) -> web.Response | None:
        """P's side once its prompt is computed: publish the KV; SGLang's P also waits for its D.

        Returns an error response when no D came in time (the proxy must call D while P waits)."""
        cfg = self.config
        _, key = kv_key
        remaining = t0 + cfg.ttft_ms / 1000.0 - asyncio.get_running_loop().time()
        if remaining > 0:  # the KV exists once the prompt is computed
            try:
                await asyncio.sleep(remaining)
            except asyncio.CancelledError:
                if cfg.protocol == "sglang":
                    self.kv_board.abort(key)  # a D already waiting for the room learns it failed
                raise
        timeout_s = cfg.kv_timeout_ms / 1000.0
        if cfg.protocol in ("mooncake", "nixl-push"):
            rank, board_key = 0, key
            if cfg.protocol == "mooncake":
                rank_text, transfer_id = key.split("/", 1)
                rank = int(rank_text)
                board_key = f"{self.engine_ids[rank]}/{transfer_id}"
            self.kv_board.publish(board_key, self._kv_for(gen, rank))
            # P holds the blocks until a D took them, or its abort timeout (Mooncake) / lease (push) passed.
            timer = asyncio.get_running_loop().call_later(timeout_s, self._expire_kv, board_key)
            self._kv_timers[board_key] = timer
            return None
        slot = self.kv_board.publish(key, self._kv_for(gen, 0))
        try:
            taken = await self.kv_board.wait_taken(slot, key, timeout_s)
        except asyncio.CancelledError:
            self.kv_board.abort(key)  # a D still waiting learns the room failed
            raise
        if taken:
            return None
        return _error_response(500, f"KV transfer timed out: no decode server took bootstrap room {key} "
                               f"within {timeout_s:g}s", type_="InternalServerError")

    async def _fetch_kv(self, kv_key: tuple[str, str]) -> dict[str, Any] | str:
        """D's side: fetch the KV from P's bootstrap server (the KV waits there until P computed it)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        base, key = kv_key
        return await fetch_kv(self._session, f"{base}/kv/{key}", self.config.kv_timeout_ms / 1000.0)

    @staticmethod
    def _fetched_kv_is_valid(kv: dict[str, Any], gen: _Gen, kv_key: tuple[str, str]) -> bool:
        """The KV is this prompt's, and (Mooncake) from the engine D was told about."""
        if kv.get("block_ids") != block_ids_for(gen.prompt_text):
            return False
        key = kv_key[1]
        return "/" not in key or key.split("/", 1)[0] == kv.get("engine_id")

    def _compute_prompt(self, gen: _Gen, t0: float) -> float:
        """Look the prompt up in the prefix cache; return when its computation ends (loop time).

        The engine computes one prompt at a time, in arrival order, for ``prefill_ms_per_token``
        per uncached token, so a request waits for those ahead of it. That order also means every
        prompt ahead is cached by the time this one starts, so the lookup happens on arrival.
        """
        cfg = self.config
        words = gen.prompt_text.split()
        hit = self.prefix_cache.lookup_and_insert(words, cfg.cache_blocks)
        gen.cached_tokens = hit
        miss = len(words) - hit
        self.stats.prompt_tokens_hit += hit
        self.stats.prompt_tokens_miss += miss
        work_s = miss * cfg.prefill_ms_per_token / 1000.0
        if work_s <= 0:
            return t0
        start = max(t0, self._compute_free_at)
        done = start + work_s
        self._compute_free_at = done
        self._compute_starts.append(start)
        return done

    async def _apply_fault(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        """Misbehave as scripted; every branch leaves aiohttp with nothing loud to log."""
        if fault.kind == "fail":
            if fault.body is not None:
                return web.Response(status=fault.status, body=fault.body, content_type="application/json")
            return _error_response(fault.status, "mock engine: scripted failure", type_="InternalServerError")
        if fault.kind == "garbage":
            return web.Response(status=200, body=_GARBAGE, content_type="application/json")
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.close()
            # aiohttp's attempt to send this hits the closed transport and is ignored quietly.
            return web.Response(status=500)
        # hang: cancelled by a client disconnect (handler_cancellation) or by server shutdown.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _kv_lost(self, request: web.Request, stream: bool) -> web.StreamResponse:
        if not stream:
            return _error_response(500, "Internal server error", type_="InternalServerError")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        error = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                           "code": 500}}
        await resp.write(b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # ---------------------------------------------------------- validation

    def _parse(self, body: dict[str, Any], chat: bool, request_id: str) -> _Gen:
        """Validate like vLLM's OpenAI server (the parts a proxy can get wrong)."""
        prompt_text = _parse_messages(body) if chat else _parse_prompt(body)
        prompt_tokens = len(prompt_text.split())

        stream = body.get("stream")
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise _BadRequest("`stream` must be a boolean.", "stream")
        stream_options = body.get("stream_options")
        if stream_options is not None:
            if not stream:
                raise _BadRequest("Stream options can only be defined when `stream=True`.", "stream_options")
            if not isinstance(stream_options, dict):
                raise _BadRequest("`stream_options` must be an object.", "stream_options")
        include_usage = bool(stream_options.get("include_usage")) if stream_options else False

        n = body.get("n")
        if n is not None and (not _is_int(n) or n < 1):
            raise _BadRequest(f"n must be at least 1, got {n}.", "n")
        if n is not None and n > 1:
            raise _BadRequest("The mock engine supports only n=1.", "n")

        max_completion_tokens = _positive_int(body, "max_completion_tokens")
        explicit = max_completion_tokens or _positive_int(body, "max_tokens")
        min_tokens = body.get("min_tokens")
        if min_tokens is not None:
            if not _is_int(min_tokens) or min_tokens < 0:
                raise _BadRequest(f"min_tokens must be greater than or equal to 0, got {min_tokens}.", "min_tokens")
            if explicit is not None and min_tokens > explicit:
                raise _BadRequest(
                    f"min_tokens must be less than or equal to max_tokens={explicit}, got {min_tokens}.",
                    "min_tokens",
                )
        if explicit is not None:
            max_tokens = explicit
        else:
            # vLLM's default is "the rest of the context"; ours is config.tokens, clamped likewise.
            max_tokens = max(self.config.tokens, min_tokens or 0)
            max_tokens = max(1, min(max_tokens, MAX_MODEL_LEN - prompt_tokens))
        if prompt_tokens + max_tokens > MAX_MODEL_LEN:
            raise _BadRequest(
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
                "the completion). Please reduce the length of the messages or completion.",
                "max_tokens",
            )

        kv = body.get("kv_transfer_params")
        if kv is not None and not isinstance(kv, dict):
            raise _BadRequest("`kv_transfer_params` must be an object.", "kv_transfer_params")

        return _Gen(
            chat=chat,
            request_id=request_id,
            prompt_text=prompt_text,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            stream=stream,
            include_usage=include_usage,
            kv=kv,
            seed=body.get("seed"),
            echo=not chat and body.get("echo") is True,
            logprobs=body.get("logprobs") if not chat and _is_int(body.get("logprobs")) else None,
        )

    def _check_role(self, gen: _Gen) -> bool:
        """Refuse work meant for the other pool, so a proxy mixing pools up fails loudly.

        Returns True for a prefill request (do_remote_decode).
        """
        kv = gen.kv or {}
        remote_decode = bool(kv.get("do_remote_decode"))
        remote_prefill = bool(kv.get("do_remote_prefill"))
        role = self.config.role
        if remote_decode and remote_prefill:
            raise _BadRequest(
                "kv_transfer_params cannot set both do_remote_decode and do_remote_prefill.",
                "kv_transfer_params",
            )
        if role == "prefill" and remote_prefill:
            raise _BadRequest(
                "This is a prefill engine; it cannot serve a decode request "
                "(kv_transfer_params.do_remote_prefill=true).",
                "kv_transfer_params",
            )
        if role == "decode" and remote_decode:
            raise _BadRequest(
                "This is a decode engine; it cannot serve a prefill request "
                "(kv_transfer_params.do_remote_decode=true).",
                "kv_transfer_params",
            )
        if remote_decode and gen.stream:
            raise _BadRequest("A prefill request (do_remote_decode=true) must not stream.", "stream")
        return remote_decode

    @staticmethod
    def _handle_is_valid(kv: dict[str, Any], gen: _Gen, request: web.Request, protocol: str = "vllm") -> bool:
        """A decode handle is valid if complete, for this prompt, and (vLLM) for this request id.

        omni's LLMDataDist D needs remote_block_ids, remote_cluster_id and remote_host_ip."""
        fields = _OMNI_HANDLE_FIELDS if protocol == "omni" else _HANDLE_FIELDS
        if any(kv.get(name) is None for name in fields):
            return False
        if kv["remote_block_ids"] != block_ids_for(gen.prompt_text):
            return False
        return protocol == "omni" or kv["remote_request_id"] == request.headers.get("X-Request-Id")

    # ---------------------------------------------------------- generation

    def _ids(self, gen: _Gen) -> tuple[str, int]:
        return ("chatcmpl-" if gen.chat else "cmpl-") + gen.request_id, int(time.time())

    def _usage(self, gen: _Gen, completion_tokens: int) -> dict[str, Any]:
        """vLLM's usage; with prompt_tokens_details on it adds the cached prompt tokens, only when there are
        some (vLLM counts a KV transfer as cached: a D that got the whole prompt reports it all)."""
        usage: dict[str, Any] = {
            "prompt_tokens": gen.prompt_tokens,
            "total_tokens": gen.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        if self.config.prompt_tokens_details and gen.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": gen.cached_tokens}
        return usage

    async def _complete(self, gen: _Gen, prefill: bool, t0: float) -> web.Response:
        """Non-streaming answer; a prefill answer also carries the NIXL-style handle."""
        cfg = self.config
        n = 1 if prefill else gen.max_tokens
        finish = "length"
        if 0 < cfg.eos_after <= n:  # the model stopped on its own before the length cap
            n, finish = cfg.eos_after, "stop"
        delay_s = (cfg.ttft_ms + (0.0 if prefill else cfg.itl_ms * (n - 1))) / 1000.0
        remaining = t0 + delay_s - asyncio.get_running_loop().time()  # t0 may lie ahead: prompt compute
        if remaining > 0:
            await asyncio.sleep(remaining)

        word = gen.word_prefix(cfg.distinct_text)
        words = [f" {word}tok{i}" for i in range(n)]
        text = "".join(words)
        logprobs: dict[str, Any] | None = None
        if not prefill and gen.echo:
            text = gen.prompt_text + text
        if not prefill and gen.logprobs is not None:
            logprobs = _mock_logprobs(gen, words)
        rid, created = self._ids(gen)
        choice: dict[str, Any]
        if gen.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": None,
            }
        payload: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion" if gen.chat else "text_completion",
            "created": created,
            "model": cfg.model,
            "choices": [choice],
            "usage": self._usage(gen, n),
        }
        if gen.generate:  # vLLM's GenerateResponse: token ids out
            out = {"index": 0, "logprobs": None, "finish_reason": finish,
                   "token_ids": [_OUT_TOKEN_BASE + i for i in range(n)]}
            payload = {"request_id": gen.request_id, "choices": [out], "usage": self._usage(gen, n),
                       "prompt_logprobs": None, "kv_transfer_params": None}
        if prefill and cfg.protocol == "omni" and finish == "length":
            # LLMDataDist holds the blocks of every length-capped request and says where they are.
            payload["kv_transfer_params"] = {
                "remote_block_ids": block_ids_for(gen.prompt_text),
                "remote_cluster_id": cfg.engine_id,
                "remote_host_ip": f"tcp://{cfg.side_channel_host}:{cfg.side_channel_port}",
                "spec_token_ids": None,
                "remote_dp_rank": 0,
                "remote_request_id": rid,
            }
        elif prefill and cfg.protocol == "nixl-push":
            payload["kv_transfer_params"] = {  # the full set, as push_scheduler answers it (D needs none of it)
                "do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [block_ids_for(gen.prompt_text)], "remote_engine_id": cfg.engine_id,
                "remote_request_id": gen.request_id, "remote_host": cfg.side_channel_host,
                "remote_port": self.bootstrap_port, "tp_size": 1, "pp_size": 1,
                "remote_num_tokens": gen.prompt_tokens, "transfer_mode": "push",
            }
        elif prefill and cfg.protocol == "vllm":
            payload["kv_transfer_params"] = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": block_ids_for(gen.prompt_text),
                "remote_engine_id": cfg.engine_id,
                "remote_request_id": gen.request_id,
                "remote_host": cfg.side_channel_host,
                "remote_port": cfg.side_channel_port,
                "tp_size": 1,
            }
        self.stats.completed += 1
        return web.Response(
            body=orjson.dumps(payload),
            content_type="application/json",
            headers={"X-Request-Id": gen.request_id},
        )

    async def _stream(self, request: web.Request, gen: _Gen, fault: _Fault | None, t0: float) -> web.StreamResponse:
        """SSE in vLLM's chunk shapes; token chunks are spliced from pre-encoded pieces."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        rid, created = self._ids(gen)
        n = gen.max_tokens
        head = b'data: {"id":%s,"object":"%s","created":%d,"model":%s,"choices":[{"index":0,' % (
            orjson.dumps(rid),
            b"chat.completion.chunk" if gen.chat else b"text_completion",
            created,
            orjson.dumps(cfg.model),
        )
        if gen.generate:  # vLLM's GenerateStreamResponse chunks
            head = b'data: {"request_id":%s,"choices":[{"index":0,"logprobs":null,' % orjson.dumps(gen.request_id)
            prefix = head + b'"token_ids":['
            suffix = b'],"finish_reason":null}]}\n\n'
            last_suffix = b'],"finish_reason":"length"}]}\n\n'
            first = b""
        elif gen.chat:
            prefix = head + b'"delta":{"content":'
            suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            last_suffix = b'},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            first = head + _ROLE_DELTA
        else:
            prefix = head + b'"text":'
            suffix = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            last_suffix = b',"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            first = b""
        to_send = n if fault is None else min(n, fault.n_chunks)
        word = gen.word_prefix(cfg.distinct_text).encode()
        echoed = orjson.dumps(gen.prompt_text + f" {word.decode()}tok0") if gen.echo else b""
        ttft_s = cfg.ttft_ms / 1000.0
        itl_s = cfg.itl_ms / 1000.0

        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Request-Id": gen.request_id,
            },
        )
        try:
            await resp.prepare(request)
            due = t0 + ttft_s  # token i is due at t0 + ttft + i*itl: no drift from sleep overhead
            timed = bool(ttft_s or itl_s) or t0 > loop.time()  # t0 may lie ahead: prompt compute
            for i in range(to_send):
                if i:
                    due += itl_s
                wait = due - loop.time() if timed else 0.0
                if wait > 0:
                    await asyncio.sleep(wait)
                elif i and i % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if i and not self._gate.is_set():
                    await self._gate.wait()
                end = last_suffix if i == n - 1 else suffix
                if gen.generate:
                    chunk = b"%s%d%s" % (prefix, _OUT_TOKEN_BASE + i, end)
                elif i == 0 and echoed:
                    chunk = b"%s%s%s" % (prefix, echoed, end)
                else:
                    chunk = b'%s" %stok%d"%s' % (prefix, word, i, end)
                if i == 0 and first:
                    chunk = first + chunk
                await resp.write(chunk)
            if fault is not None:
                if fault.kind == "die":
                    if request.transport is not None:
                        request.transport.close()  # flushes what was written, then FIN mid-body
                    return resp
                await loop.create_future()  # stall: until disconnect or shutdown cancels us
            if gen.include_usage:
                usage: dict[str, Any] = {
                    "id": rid,
                    "object": "chat.completion.chunk" if gen.chat else "text_completion",
                    "created": created,
                    "model": cfg.model,
                    "choices": [],
                    "usage": self._usage(gen, n),
                }
                if gen.generate:
                    usage = {"request_id": gen.request_id, "choices": [], "usage": usage["usage"]}
                await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n" + _DONE)
            else:
                await resp.write(_DONE)
            await resp.write_eof()
        except ConnectionResetError:  # includes aiohttp.ClientConnectionResetError
            self.stats.aborted += 1
            return resp
        self.stats.completed += 1
        return resp


def _runner(engine: MockEngine) -> web.AppRunner:
    """Runner with handler cancellation (disconnects reach the handler) and no access log (speed)."""
    return web.AppRunner(engine.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)


def _base_url(runner: web.AppRunner, host: str) -> str:
    port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def start_mock(
    config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[MockEngine, web.AppRunner, str]:
    """Start an engine on a real socket; returns (engine, runner, base_url).

    The caller owns the runner and must ``await runner.cleanup()``.
    """
    engine = MockEngine(config)
    engine.bind_host = host
    runner = _runner(engine)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        url = _base_url(runner, host)
    except BaseException:
        await runner.cleanup()
        raise
    return engine, runner, url


async def serve_mock(config: MockConfig, host: str, port: int) -> None:
    """Run one engine until cancelled (the ``pdproxy mock`` command)."""
    engine, runner, url = await start_mock(config, host, port)
    try:
        log.info(
            "mock engine role=%s protocol=%s engine_id=%s listening on %s%s",
            engine.config.role,
            engine.config.protocol,
            engine.config.engine_id,
            url,
            f" (bootstrap server on port {engine.bootstrap_port})" if engine.bootstrap_port else "",
        )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
