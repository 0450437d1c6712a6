"""Request checks: JSON depth (probe F4), request ids (F17), the Via loop guard (F9), own listen addresses."""

from __future__ import annotations

import time

import orjson
import pytest

from pdproxy.errors import InvalidRequest
from pdproxy.http.validate import (
    MAX_JSON_DEPTH,
    LoopGuard,
    json_depth_ok,
    listen_addresses_conflict,
    loads_request,
    sanitize_request_id,
)


def nested(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    """`{"prompt":"x","x": <depth - 1 levels>}`: `depth` levels counting the outer object."""
    if depth == 1:
        return b'{"prompt":"x"}'
    return ('{"prompt":"x","x":' + opener * (depth - 1) + closer * (depth - 1) + "}").encode()


# ---------------------------------------------------------------- JSON depth


@pytest.mark.parametrize("depth", [1, 2, 64, MAX_JSON_DEPTH])
def test_depth_up_to_the_limit_is_accepted(depth: int) -> None:
    raw = nested(depth)
    assert json_depth_ok(orjson.loads(raw))
    assert loads_request(raw) == orjson.loads(raw)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1024])
def test_deeper_is_a_400_that_says_why(depth: int) -> None:
    raw = nested(depth)
    assert not json_depth_ok(orjson.loads(raw))
    with pytest.raises(InvalidRequest, match=f"nests deeper than {MAX_JSON_DEPTH} levels") as caught:
        loads_request(raw)
    assert caught.value.status == 400


def test_the_probes_body_of_300_levels_is_a_400() -> None:
    raw = ('{"prompt":"x","x":' + "[" * 300 + "]" * 300 + "}").encode()  # probe F4's reproduction
    with pytest.raises(InvalidRequest, match="nests deeper"):
        loads_request(raw)


def test_deeper_than_orjson_parses_is_the_same_400() -> None:
    with pytest.raises(InvalidRequest, match="nests deeper than"):
        loads_request(nested(2000))


def test_objects_count_as_levels_too() -> None:
    def objects(depth: int) -> bytes:
        return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)

    assert loads_request(objects(MAX_JSON_DEPTH))
    with pytest.raises(InvalidRequest, match="nests deeper"):
        loads_request(objects(MAX_JSON_DEPTH + 1))


def test_brackets_inside_strings_do_not_count() -> None:
    raw = orjson.dumps({"prompt": "[" * 10_000 + "{" * 10_000})
    assert loads_request(raw)["prompt"].startswith("[[[")


def test_many_shallow_containers_are_fine() -> None:
    raw = orjson.dumps({"prompt": "x", "messages": [{"role": "user", "content": [{"type": "text"}]}] * 5000})
    assert loads_request(raw)["prompt"] == "x"


def test_a_wide_document_fails_on_its_one_deep_branch() -> None:
    document = {"a": [[1]] * 1000, "b": orjson.loads(nested(MAX_JSON_DEPTH + 1))}
    assert not json_depth_ok(document)


def test_invalid_json_is_a_400() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        loads_request(b'{"prompt": ')


def test_a_normal_body_costs_microseconds() -> None:
    """The check on a 4 KiB chat body (measured ~1.4 µs on 2 cores; a generous bound for a loaded box)."""
    body = orjson.dumps({"model": "m", "stream": True, "max_tokens": 64,
                         "messages": [{"role": "user", "content": "word " * 800}]})
    assert 4000 <= len(body) <= 4300
    document = orjson.loads(body)
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        json_depth_ok(document)
    per_call = (time.perf_counter() - started) / rounds
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per check"


# ---------------------------------------------------------------- request ids


@pytest.mark.parametrize("value", ["abc", "req-42", "a.b_c:d-E", "0" * 128,
                                   "chatcmpl-3f1e2d4c-5b6a-7980-a1b2-c3d4e5f60718"])
def test_good_request_ids_are_kept(value: str) -> None:
    assert sanitize_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "x 10.9.9.9 /v1/completions 200 P=http://fake:1", "a\nb", "a\tb",
                                   'a"b', "a/b", "a=b", "0" * 129, "é", "a\x00b", "a\x1b[31mred"])
def test_anything_else_is_dropped(value: str | None) -> None:
    assert sanitize_request_id(value) is None


# ---------------------------------------------------------------- loop guard


def test_a_request_through_this_proxy_is_seen() -> None:
    guard = LoopGuard.create()
    assert guard.token.startswith("pdproxy-")
    assert guard.seen_self(guard.via_header())
    assert guard.seen_self(guard.via_header("1.1 edge-lb, 1.0 fred"))
    assert guard.seen_self(f"1.1 edge, 1.1 {guard.token} (pdproxy), HTTP/2 other")


def test_other_proxies_and_other_instances_are_not_seen() -> None:
    guard, other = LoopGuard.create(), LoopGuard.create()
    assert guard.token != other.token
    assert not guard.seen_self(None)
    assert not guard.seen_self("")
    assert not guard.seen_self("1.1 edge-lb")
    assert not guard.seen_self(other.via_header())
    assert not guard.seen_self(f"1.1 {guard.token}x")  # a longer pseudonym is another one
    assert not guard.seen_self(f"1.1 edge ({guard.token})")  # named in a comment only


def test_via_header_appends_to_the_clients_entries() -> None:
    guard = LoopGuard.create("pdproxy-abc")
    assert guard.via_header() == "1.1 pdproxy-abc"
    assert guard.via_header("1.1 edge") == "1.1 edge, 1.1 pdproxy-abc"


def test_a_chain_of_two_instances_loops_back_to_the_first() -> None:
    first, second = LoopGuard.create(), LoopGuard.create()
    via = first.via_header(None)  # first -> second
    assert not second.seen_self(via)
    via = second.via_header(via)  # second -> first again
    assert first.seen_self(via)


# ---------------------------------------------------------------- own listen addresses


@pytest.mark.parametrize(("url", "own", "expected"), [
    ("http://127.0.0.1:8000", [("0.0.0.0", 8000)], True),
    ("http://localhost:8000", [("0.0.0.0", 8000)], True),
    ("http://[::1]:8000", [("::", 8000)], True),
    ("http://[::ffff:7f00:1]:8000", [("0.0.0.0", 8000)], True),
    ("http://0.0.0.0:8000", [("0.0.0.0", 8000)], True),
    ("http://127.0.0.2:8000", [("", 8000)], True),
    ("http://10.0.0.5:8000", [("10.0.0.5", 8000)], True),
    ("http://127.0.0.1:8000", [("127.0.0.1", 8000)], True),
    ("http://localhost:8000", [("127.0.0.1", 8000)], True),
    ("http://127.0.0.1:8001", [("0.0.0.0", 8000), ("127.0.0.1", 9100)], False),
    ("http://127.0.0.1:9100", [("0.0.0.0", 8000), ("127.0.0.1", 9100)], True),
    ("http://127.0.0.1:8000", [("10.0.0.5", 8000)], False),  # a listener on another address only
    ("http://10.0.0.6:8000", [("0.0.0.0", 8000)], False),
    ("http://p0.example:8000", [("0.0.0.0", 8000)], False),
    ("http://127.0.0.1:8000", [], False),
])
def test_listen_addresses_conflict(url: str, own: list[tuple[str, int]], expected: bool) -> None:
    assert listen_addresses_conflict(url, own) is expected


def test_the_machines_own_names_count_for_a_wildcard_listener() -> None:
    assert listen_addresses_conflict("http://gpu-node-7:8000", [("0.0.0.0", 8000)], local_hosts=["gpu-node-7"])
    assert not listen_addresses_conflict("http://gpu-node-7:8000", [("10.0.0.5", 8000)], local_hosts=["gpu-node-7"])
