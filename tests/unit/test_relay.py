"""The relay alone, against a scripted upstream stream and client sink: back-pressure, endings, boundaries."""

from __future__ import annotations

import asyncio

from pdproxy.proxy.relay import Relay


class FakeStream:
    """What the relay drives on the upstream side."""

    def __init__(self) -> None:
        self.sink: Relay | None = None
        self.paused = False
        self.aborted = False
        self.pauses = 0

    def start(self, sink: Relay) -> None:
        self.sink = sink

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True


class FakeOut:
    """The client side: a write buffer with a high-water mark."""

    def __init__(self, high: int = 10) -> None:
        self.high = high
        self.buffer = 0
        self.written: list[bytes] = []
        self.on_drain = None

    @property
    def paused(self) -> bool:
        return self.buffer > self.high

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffer += len(data)

    def drain(self) -> None:
        self.buffer = 0
        assert self.on_drain is not None
        self.on_drain()


class Gaps:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


async def make(end: float | None = None, gaps: Gaps | None = None) -> tuple[Relay, FakeStream, FakeOut]:
    stream, out = FakeStream(), FakeOut()
    relay = Relay(asyncio.get_running_loop(), stream, out, end=end, gaps=gaps)  # type: ignore[arg-type]
    return relay, stream, out


async def test_first_bytes_then_the_rest_in_order() -> None:
    relay, stream, out = await make()
    relay.begin(b"data: 1\n\n")
    assert stream.sink is relay
    relay.on_data(b"data: 2\n\n")
    relay.on_end()
    assert await relay.done is None
    assert out.written == [b"data: 1\n\n", b"data: 2\n\n"]
    assert relay.bytes == 18
    assert relay.tail.endswith(b"data: 2\n\n")


async def test_a_full_client_pauses_the_upstream_and_its_drain_resumes_it() -> None:
    relay, stream, out = await make()
    relay.begin(b"x" * 4)
    assert not stream.paused
    relay.on_data(b"y" * 20)  # over the high-water mark
    assert stream.paused and stream.pauses == 1
    relay.on_data(b"z")  # bytes already on their way are still written, no second pause
    assert stream.pauses == 1
    out.drain()
    assert not stream.paused
    relay.on_end()
    assert await relay.done is None


async def test_an_upstream_error_ends_the_relay_with_it() -> None:
    relay, _stream, _out = await make()
    relay.begin(b"data: 1\n\n")
    error = ConnectionError("gone")
    relay.on_error(error)  # type: ignore[arg-type]
    assert await relay.done is error
    relay.on_data(b"late")  # nothing after the end
    assert relay.bytes == 9


async def test_the_total_deadline_aborts_the_upstream() -> None:
    loop = asyncio.get_running_loop()
    relay, stream, _out = await make(end=loop.time() + 0.05)
    relay.begin(b"data: 1\n\n")
    assert await asyncio.wait_for(relay.done, 2) == "decode_total"
    assert stream.aborted and relay.fired == "decode_total"


async def test_an_operator_cut_ends_it_once() -> None:
    relay, stream, _out = await make()
    relay.begin(b"data: 1\n\n")
    relay.fire("upstream removed")
    relay.fire("again")
    relay.on_end()
    assert await relay.done == "upstream removed"
    assert stream.aborted


async def test_close_aborts_an_unfinished_stream_and_detaches_from_the_client() -> None:
    relay, stream, out = await make()
    relay.begin(b"data")
    relay.close()
    assert stream.aborted and out.on_drain is None
    assert await relay.done == "cancelled"


async def test_close_after_the_end_leaves_the_connection_alone() -> None:
    relay, stream, _out = await make()
    relay.begin(b"data: 1\n\n")
    relay.on_end()
    relay.close()
    assert not stream.aborted


async def test_event_boundary() -> None:
    relay, _stream, _out = await make()
    assert relay.on_event_boundary
    relay.begin(b'data: {"a": 1}\n\ndata: {"cho')
    assert not relay.on_event_boundary
    relay.on_data(b'ices": []}\n\n')
    assert relay.on_event_boundary


async def test_sampled_streams_record_chunk_gaps() -> None:
    gaps = Gaps()
    relay, _stream, _out = await make(gaps=gaps)
    relay.begin(b"a")
    relay.on_data(b"b")
    assert len(gaps.values) == 2 and all(value >= 0 for value in gaps.values)


async def test_close_aborts_when_the_waiting_task_was_cancelled() -> None:
    """Cancelling the handler that awaits `done` cancels the future too: the relay must still abort D."""
    relay, stream, _out = await make()
    relay.begin(b"data")
    waiter = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(relay.done), 5))
    relay.done.cancel()
    relay.close()
    assert stream.aborted
    waiter.cancel()
