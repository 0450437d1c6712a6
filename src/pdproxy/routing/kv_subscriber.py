"""One subscription per prefill server to its KV-cache events: live PUB messages, replays, reconnects.

Where to subscribe comes from the configuration, or from the engine itself (`GET
/kv_event_sources`, which vLLM answers with its publisher config; `tcp://*:PORT` means the
engine's own host). The live socket subscribes to every topic and checks the topic itself.

A ZMQ SUB socket reconnects silently, so the socket's monitor tells when the connection drops:
whatever was missed, even an engine restart that started its sequence again, is unknown, so
the view starts again from a replay. Every wait is bounded: the replay by `replay_timeout` per
message, the discovery by its HTTP timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from pdproxy.routing.kv_events import END_SEQ, BadBatch, ServerCache, decode_seq
from pdproxy.routing.wiring import Background

log = logging.getLogger("pdproxy.kv_events")

REPLAY_TIMEOUT = 1.0  # seconds the replay socket may take per message
RETRY_INTERVAL = 1.0  # seconds between replay (or discovery) attempts that failed
DISCOVERY_TIMEOUT = 2.0
MAX_REPLAY = 100_000  # batches one replay may return (vLLM keeps 10,000 by default)


@dataclass(frozen=True, slots=True)
class EventSource:
    """Where one engine publishes: its PUB endpoint, its replay endpoint if any, and the topic."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


def resolve(endpoint: str, engine_url: str) -> str:
    """`tcp://*:5557` (bound on every interface of the engine) -> `tcp://<engine host>:5557`."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("*", "0.0.0.0", "[::]", "::", ""):
        host = urlsplit(engine_url).hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def discover(session: aiohttp.ClientSession, engine_url: str) -> EventSource | None:
    """The engine's publisher from `GET /kv_event_sources` (data-parallel rank 0); None if it has none."""
    try:
        async with session.get(engine_url + "/kv_event_sources",
                               timeout=aiohttp.ClientTimeout(total=DISCOVERY_TIMEOUT)) as resp:
            if resp.status != 200:
                return None
            sources = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    config = sources.get("0") if isinstance(sources, dict) else None
    if not isinstance(config, dict) or not config.get("enable_kv_cache_events") or config.get("publisher") != "zmq":
        return None
    endpoint, replay = config.get("endpoint"), config.get("replay_endpoint")
    if not isinstance(endpoint, str) or "://" not in endpoint:
        return None
    return EventSource(resolve(endpoint, engine_url),
                       resolve(replay, engine_url) if isinstance(replay, str) and "://" in replay else None,
                       config.get("topic") if isinstance(config.get("topic"), str) else "")


class KvSubscriber:
    """Feeds one `ServerCache` from one engine until `stop()`."""

    def __init__(self, cache: ServerCache, source: EventSource, context: zmq.asyncio.Context, *,
                 on_garbage: Callable[[], None] = lambda: None, replay_timeout: float = REPLAY_TIMEOUT,
                 retry_interval: float = RETRY_INTERVAL) -> None:
        self.cache = cache
        self.source = source
        self._context = context
        self._on_garbage = on_garbage
        self._replay_timeout = replay_timeout
        self._retry_interval = retry_interval
        self._topic = source.topic.encode()
        self._task = Background(self._run)

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: filtered here (see module docstring)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.source.endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        loop = asyncio.get_running_loop()
        connected = False
        retry_at = 0.0
        try:
            while True:
                cache = self.cache
                if connected and cache.replay_from is not None and loop.time() >= retry_at:
                    await self._replay()
                    if cache.replay_from is not None:
                        retry_at = loop.time() + self._retry_interval
                wait = max(retry_at - loop.time(), 0.0) if connected and cache.replay_from is not None else None
                ready = dict(await poller.poll(None if wait is None else int(wait * 1000) + 1))
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_CONNECTED:
                        connected, retry_at = True, 0.0
                    elif event["event"] == zmq.EVENT_DISCONNECTED:
                        connected = False
                        cache.disconnected()
                if sub in ready:
                    self._live(await sub.recv_multipart())
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    def _live(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self._garbage(f"a message of {len(frames)} frames")
            return
        if self._topic and frames[0] != self._topic:
            return  # another topic on the same socket: not ours
        try:
            seq = decode_seq(frames[1])
        except BadBatch as exc:
            self._garbage(str(exc))
            return
        before = self.cache.garbage
        self.cache.live(seq, frames[2])
        if self.cache.garbage != before:
            self._on_garbage()

    def _garbage(self, what: str) -> None:
        self.cache.garbage += 1
        self._on_garbage()
        log.debug("%s: ignored a message that is not a KV-event batch (%s)", self.cache.name, what)

    async def _replay(self) -> None:
        """Ask for every batch from `replay_from`; hand the cache what came, or None on no answer."""
        cache = self.cache
        start = cache.replay_from
        if start is None:
            return
        if self.source.replay_endpoint is None:
            cache.replayed(None)
            return
        dealer = self._context.socket(zmq.DEALER)  # a fresh one each time: no late answer of an old replay
        dealer.setsockopt(zmq.LINGER, 0)
        batches: list[tuple[int, bytes]] = []
        try:
            dealer.connect(self.source.replay_endpoint)
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while len(batches) < MAX_REPLAY:
                if not await dealer.poll(int(self._replay_timeout * 1000)):
                    log.warning("%s: no replay from %s within %gs", cache.name, self.source.replay_endpoint,
                                self._replay_timeout)
                    cache.replayed(None)
                    return
                frames = await dealer.recv_multipart()
                # vLLM 0.32: (b"", topic, seq, batch), the end (b"", b"", -1, b""); before: (b"", seq, batch)
                if len(frames) == 4 and frames[0] == b"":
                    frames = frames[:1] + frames[2:]
                if len(frames) != 3 or frames[0] != b"":
                    self._garbage(f"replay message of {len(frames)} frames")
                    continue
                try:
                    seq = decode_seq(frames[1])
                except BadBatch as exc:
                    self._garbage(str(exc))
                    continue
                if seq == END_SEQ:
                    break
                batches.append((seq, frames[2]))
        finally:
            dealer.close(linger=0)
        before = cache.garbage
        cache.replayed(batches)
        if cache.garbage != before:
            self._on_garbage()
