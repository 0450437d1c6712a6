"""The mock engine's KV-cache event publisher, in vLLM's format (see `vllm/distributed/kv_events.py`).

Like vLLM 0.32's ZmqEventPublisher: a PUB socket sends `(topic, seq as 8 bytes big-endian, msgpack
batch)`, seq counting from 0; a ROUTER socket answers a replay request (an 8-byte start seq) with
`(b"", topic, seq, batch)` for each buffered batch from there, then `(b"", b"", -1, b"")`. As in vLLM 0.32, a
batch is an array-like msgspec struct `[ts, events, data_parallel_rank]` and each event a tagged map
(`{"type": "BlockStored", "block_hashes": ..., ...}`), block hashes as ints. The mock's tokens are words, so a
block's token ids are `word_token_id` of its words (the same function pdproxy's "words"
tokenizer uses). Test hooks: drop batches (a gap), send raw frames (garbage), no replay socket.

Standalone like `mock`: it imports nothing from the rest of pdproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def word_token_id(word: str) -> int:
    """The mock engine's token id of one whitespace-separated word."""
    return zlib.crc32(word.encode()) & 0x7FFFFFFF


class _KvEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    pass


class BlockStored(_KvEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(_KvEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(_KvEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class KvEventPublisher:
    """PUB + replay ROUTER on loopback ports chosen by the OS (or given, to stand in for a restart)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, replay: bool = True, replay_port: int = 0,
                 topic: str = "kv", buffer_steps: int = 10_000) -> None:
        self._context = zmq.asyncio.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._drop = 0
        self.topic = topic
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(f"tcp://{host}:{port or '*'}")
        self.port = int(self._pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_port: int | None = None
        self._task: asyncio.Task[None] | None = None
        if replay:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(f"tcp://{host}:{replay_port or '*'}")
            self.replay_port = int(self._replay.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            self._task = asyncio.ensure_future(self._serve_replay())

    def sources(self) -> dict[str, dict[str, object]]:
        """`GET /kv_event_sources` as vLLM answers it: the publisher config per data-parallel rank."""
        return {"0": {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{self.port}",
                      "replay_endpoint": f"tcp://*:{self.replay_port}" if self.replay_port else None,
                      "buffer_steps": self._buffer.maxlen, "hwm": 100_000, "max_queue_size": 100_000,
                      "topic": self.topic}}

    @property
    def next_seq(self) -> int:
        return self._seq

    # -- what the prefix cache reports ------------------------------------------------------------

    def stored(self, hashes: Sequence[int], parent: int | None, words: Sequence[str], block_size: int) -> None:
        self._publish([BlockStored(list(hashes), parent, [word_token_id(w) for w in words], block_size,
                                   None, "GPU", None)])

    def removed(self, hashes: Sequence[int]) -> None:
        self._publish([BlockRemoved(list(hashes), "GPU")])

    def cleared(self) -> None:
        self._publish([AllBlocksCleared()])

    # -- test hooks -------------------------------------------------------------------------------

    def drop_next(self, batches: int = 1) -> None:
        """Do not send the next `batches` (their seqs are used and they stay replayable): a gap."""
        self._drop += batches

    def send_raw(self, *frames: bytes) -> None:
        """Send frames as they are (garbage, for the subscriber's error handling)."""
        self._pub.send_multipart(frames, flags=zmq.NOBLOCK)

    # -- internals --------------------------------------------------------------------------------

    def _publish(self, events: list[BlockStored | BlockRemoved | AllBlocksCleared]) -> None:
        seq = self._seq
        self._seq += 1
        payload = self._encoder.encode(KVEventBatch(time.time(), events, 0))
        self._buffer.append((seq, payload))
        if self._drop:
            self._drop -= 1
            return
        with contextlib.suppress(zmq.Again):  # PUB drops at its high-water mark, as vLLM's does
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("mock kv events: invalid replay request of %d frames", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._context.term()
