"""The fan-out's pure parts: sub-flow bodies, the width bound, and the stream merger's event handling
(events cut anywhere by the network, usage summing, error events, back-pressure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from pdproxy.errors import InvalidRequest
from pdproxy.proxy.fanout import StreamMerger, check_width, sub_bodies


class FakeOut:
    """The client's response stream, recorded."""

    def __init__(self) -> None:
        self.data = b""
        self.ended = False
        self.paused = False
        self.on_drain: Any = None

    def write(self, data: bytes) -> None:
        assert not self.ended
        self.data += data

    def end(self) -> None:
        self.ended = True


class FakeRequest:
    def __init__(self) -> None:
        self.out = FakeOut()
        self.started: list[tuple[int, Sequence[tuple[str, str]]]] = []

    def start_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> FakeOut:
        self.started.append((status, headers))
        return self.out


def chunk(text: str, index: int = 0, rid: str = "cmpl-x") -> bytes:
    return b"data: " + orjson.dumps({"id": rid, "object": "text_completion", "created": 1, "model": "m",
                                     "choices": [{"index": index, "text": text}]}) + b"\n\n"


def usage(prompt: int, completion: int) -> bytes:
    return b"data: " + orjson.dumps({"id": "u", "object": "text_completion", "created": 1, "model": "m",
                                     "choices": [], "usage": {"prompt_tokens": prompt,
                                                              "completion_tokens": completion}}) + b"\n\n"


def events(raw: bytes) -> list[Any]:
    return [e[6:] if e[6:] == b"[DONE]" else orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e]


def test_sub_bodies_split_prompts_drop_n_and_step_the_seed() -> None:
    body = {"prompt": ["a", [1, 2]], "n": 2, "seed": 10, "max_tokens": 3}
    subs = sub_bodies(body, 2, 2)
    assert [s["prompt"] for s in subs] == ["a", "a", [1, 2], [1, 2]]
    assert [s["seed"] for s in subs] == [10, 11, 10, 11]
    assert all("n" not in s and s["max_tokens"] == 3 for s in subs)
    assert body == {"prompt": ["a", [1, 2]], "n": 2, "seed": 10, "max_tokens": 3}  # the client's, untouched


def test_sub_bodies_keep_a_single_prompt_and_a_non_integer_seed() -> None:
    subs = sub_bodies({"prompt": ["only"], "n": 3, "seed": "x"}, 1, 3)
    assert [s["prompt"] for s in subs] == [["only"]] * 3 and [s["seed"] for s in subs] == ["x"] * 3
    assert [s.get("seed") for s in sub_bodies({"messages": [], "n": 2, "seed": True}, 1, 2)] == [True, True]


def test_check_width() -> None:
    check_width(4, 4, 16)
    with pytest.raises(InvalidRequest) as caught:
        check_width(3, 6, 16)
    assert caught.value.param == "n" and "18 PD flows" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        check_width(17, 1, 16)
    assert caught.value.param == "prompt"


@pytest.mark.parametrize("cut", [1, 7, 33, 64])
async def test_merger_reassembles_events_cut_anywhere_and_rewrites_indexes(cut: int) -> None:
    request = FakeRequest()
    merger = StreamMerger(request, "rid", n=2, width=4)  # type: ignore[arg-type]
    raw = {k: chunk(f"t{k}a", rid=f"cmpl-{k}") + chunk(f"t{k}b", rid=f"cmpl-{k}") + usage(5 + k, 2)
           + b"data: [DONE]\n\n" for k in range(4)}
    sinks = {k: merger.start(k, 200, [("X-Request-Id", f"rid-{k}"), ("Content-Type", "text/event-stream")])
             for k in (2, 0, 3, 1)}
    assert request.started == [(200, [("X-Request-Id", "rid"), ("Content-Type", "text/event-stream")])]
    for at in range(0, max(map(len, raw.values())), cut):  # interleaved, in pieces of `cut` bytes
        for k in (3, 1, 0, 2):
            piece = raw[k][at:at + cut]
            if piece:
                sinks[k].write(piece)
    merger.finish(include_usage=True)
    out = events(request.out.data)
    assert out[-1] == b"[DONE]" and out.count(b"[DONE]") == 1
    texts = {k: "".join(e["choices"][0]["text"] for e in out[:-2] if e["choices"][0]["index"] == k)
             for k in range(4)}
    assert texts == {k: f"t{k}at{k}b" for k in range(4)}
    assert {e["id"] for e in out[:-1]} == {out[0]["id"]}  # one id throughout
    # prompts counted once each (samples 0 and 2 are the prompts' first), completions for all four
    assert out[-2]["choices"] == [] and out[-2]["usage"] == {"prompt_tokens": 5 + 7, "completion_tokens": 8,
                                                             "total_tokens": 20}
    assert request.out.ended


async def test_merger_error_event_ends_the_stream_once() -> None:
    request = FakeRequest()
    merger = StreamMerger(request, "rid", n=1, width=2)  # type: ignore[arg-type]
    a, b = merger.start(0, 200, []), merger.start(1, 200, [])
    a.write(chunk("x"))
    b.write(b'data: {"tok' + b'\n\ndata: {"error": {"message": "decode stream broke", "code": 502}}\n\n')
    assert merger.broken.done()
    a.write(chunk("late"))  # dropped: the answer is over
    merger.finish(include_usage=True)  # too late: nothing more
    out = events(request.out.data)
    assert out[0]["choices"][0]["text"] == "x"
    assert out[1]["error"]["message"] == "decode stream broke" and out[2] == b"[DONE]" and len(out) == 3


async def test_merger_passes_back_pressure_both_ways() -> None:
    request = FakeRequest()
    merger = StreamMerger(request, "rid", n=1, width=2)  # type: ignore[arg-type]
    sinks = [merger.start(0, 200, []), merger.start(1, 200, [])]
    woken: list[int] = []
    for k, sink in enumerate(sinks):
        sink.on_drain = lambda k=k: woken.append(k)
    request.out.paused = True
    assert all(sink.paused for sink in sinks)
    request.out.on_drain()
    assert woken == [0, 1]
