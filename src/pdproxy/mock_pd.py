"""The mock engine's PD protocols other than vLLM NIXL pull: SGLang rooms and vLLM Mooncake.

Standalone like ``mock.py`` (it imports nothing else from ``pdproxy``). The KV "transfer" is an
HTTP fetch from D to P's *bootstrap server* (its own aiohttp app on its own port, as the real
ones are), so P and D may run in one process (the tests) or in two (``pdproxy mock``):

- SGLang: P publishes the room's KV once its prompt is computed and answers only after a D took
  it; D asks P's bootstrap server for the room and waits for it. Both waits end after
  ``kv_timeout_ms`` (SGLang's bootstrap and waiting timeouts, 300 s each, shortened), so a proxy
  that waits for P before calling D fails instead of hanging.
- NIXL push: P publishes the KV under its engine id and the request id and answers at once; D,
  told P's engine id and side-channel address, fetches it under its *own* X-Request-Id, so the two
  legs must carry the same id (vLLM pairs them by request id).
- Mooncake: P's bootstrap server answers ``GET /query`` (engine id per DP rank, as vLLM's
  ``MooncakeBootstrapServer``); P publishes the KV under the request's ``transfer_id`` and answers
  at once, without params; D fetches it by transfer id and waits for it (vLLM: up to 480 s).

What D fetches is the prompt's block ids and P's engine id, so D can check it got the KV of its
own prompt from the engine it was told about.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

PROTOCOLS = ("vllm", "omni", "sglang", "mooncake", "nixl-push")
# Protocols whose P serves a bootstrap server (for NIXL push: it stands for P's NIXL side channel).
BOOTSTRAPPED = ("sglang", "mooncake", "nixl-push")

_ABORTED: dict[str, Any] = {}  # the KV a slot gets when its prefill was aborted (never a real KV)


@dataclass(slots=True)
class _Slot:
    """One room / transfer id: P's KV once computed, and whether a D took it."""

    kv: asyncio.Future[dict[str, Any]]
    taken: asyncio.Event = field(default_factory=asyncio.Event)


class KvBoard:
    """Rooms (or transfer ids) between a P and the D that fetches from it; whoever comes first
    creates the slot, and it is dropped when taken, timed out or aborted, so it stays bounded."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def _slot(self, key: str) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(asyncio.get_running_loop().create_future())
        return slot

    def publish(self, key: str, kv: dict[str, Any]) -> _Slot:
        slot = self._slot(key)
        if not slot.kv.done():
            slot.kv.set_result(kv)
        return slot

    def abort(self, key: str) -> None:
        """P gave up on this key: a D waiting for it learns at once (SGLang marks the room failed)."""
        slot = self._slots.pop(key, None)
        if slot is not None and not slot.kv.done():
            slot.kv.set_result(_ABORTED)

    async def wait_taken(self, slot: _Slot, key: str, timeout: float) -> bool:
        """P's side: True once a D took `key`; False after `timeout` (the slot is dropped)."""
        try:
            await asyncio.wait_for(slot.taken.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            self.abort(key)
            return False

    async def take(self, key: str, timeout: float) -> dict[str, Any] | None:
        """D's side: P's KV for `key`, waiting up to `timeout`; None when P aborted or never came."""
        slot = self._slot(key)
        try:
            kv = await asyncio.wait_for(asyncio.shield(slot.kv), timeout)
        except asyncio.TimeoutError:
            if self._slots.get(key) is slot and not slot.kv.done():
                del self._slots[key]
            return None
        if kv is _ABORTED:
            return None
        slot.taken.set()
        if self._slots.get(key) is slot:
            del self._slots[key]
        return kv


class BootstrapServer:
    """P's bootstrap server: `/kv/{key}` (the mock's transfer), `/query` (Mooncake), `/health`."""

    def __init__(
        self, board: KvBoard, engine_ids: list[str], worker_addr: str, timeout_s: float, on_fetch: Callable[[], None]
    ) -> None:
        self.board = board
        self._on_fetch = on_fetch  # told when a D's fetch arrives (tests wait on it)
        self.engine_ids = engine_ids
        self.worker_addr = worker_addr
        self.timeout_s = timeout_s
        self.queries = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/kv/{key:.+}", self._kv)  # Mooncake keys are engine_id/transfer_id
        app.router.add_get("/query", self._query)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _kv(self, request: web.Request) -> web.Response:
        self._on_fetch()
        kv = await self.board.take(request.match_info["key"], self.timeout_s)
        if kv is None:
            return web.json_response({"error": "no KV for this key (prefill aborted or never came)"}, status=404)
        return web.json_response(kv)

    async def _query(self, _request: web.Request) -> web.Response:
        self.queries += 1
        payload = {str(rank): {"engine_id": engine_id, "worker_addr": {"0": {"0": self.worker_addr}}}
                   for rank, engine_id in enumerate(self.engine_ids)}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)


async def fetch_kv(session: aiohttp.ClientSession, url: str, timeout_s: float) -> dict[str, Any] | str:
    """D's side of the transfer: the KV, or why it could not be had."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s + 1.0)) as resp:
            body = await resp.read()
            if resp.status != 200:
                return f"KV fetch from {url} answered {resp.status}"
            kv = orjson.loads(body)
            return kv if isinstance(kv, dict) else f"KV fetch from {url}: not a JSON object"
    except asyncio.TimeoutError:
        return f"KV fetch from {url} timed out"
    except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
        return f"KV fetch from {url} failed: {exc}"


def sglang_target(body: dict[str, Any], own_port: int) -> tuple[str, str] | str:
    """(bootstrap base URL, room) of an SGLang request, or what is wrong with its fields.

    The mock serves one prompt, so a batch of bootstrap fields must be of length one."""
    fields = []
    for name in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        value = body.get(name)
        if isinstance(value, list):
            if len(value) != 1:
                return f"`{name}` has {len(value)} entries for 1 prompt"
            value = value[0]
        fields.append(value)
    host, port, room = fields
    if not isinstance(host, str) or not host:
        return "a disaggregated request needs `bootstrap_host`"
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 2**63:
        return "a disaggregated request needs an integer `bootstrap_room` in [0, 2**63)"
    if port is None:
        port = own_port  # as SGLang's D does: a null port means "the same port as mine"
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return "`bootstrap_port` must be a port number or null"
    return f"http://{host}:{port}", str(room)
