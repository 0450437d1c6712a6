"""The cached_tokens rewrite: found by a byte search, never missed across reads, nothing else touched."""

from __future__ import annotations

import orjson
import pytest

from pdproxy.proxy.usage import (
    FIELD,
    answer_cached_tokens,
    prefill_cached_tokens,
    rewrite_cached_tokens,
    usage_in_stream,
)

USAGE_EVENT = (b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":40,"total_tokens":42,'
               b'"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":40}}}\n\ndata: [DONE]\n\n')


def test_a_whole_answer_gets_p_s_count_and_nothing_else_changes() -> None:
    out, carry = rewrite_cached_tokens(USAGE_EVENT, b"32")
    assert carry == b""
    assert out == USAGE_EVENT.replace(b'"cached_tokens":40', b'"cached_tokens":32')


def test_spaces_after_the_colon_and_several_fields() -> None:
    data = b'{"a":{"cached_tokens" : 1},"b":{"cached_tokens":  77}}'
    # engines write no space before the colon (vLLM's pydantic, orjson): that one is not searched for
    assert rewrite_cached_tokens(data, b"0")[0] == b'{"a":{"cached_tokens" : 1},"b":{"cached_tokens":  0}}'
    data = b'{"a":{"cached_tokens": 1},"b":{"cached_tokens":  77}}'
    assert rewrite_cached_tokens(data, b"5")[0] == b'{"a":{"cached_tokens": 5},"b":{"cached_tokens":  5}}'


def test_text_that_spells_the_field_inside_a_string_is_left_alone() -> None:
    data = orjson.dumps({"choices": [{"text": '"cached_tokens": 99'}]})
    assert FIELD not in data
    assert rewrite_cached_tokens(data, b"1")[0] == data


def test_no_field_and_null_are_left_alone() -> None:
    for data in (b"data: {}\n\n", b'{"cached_tokens":null}', b""):
        assert rewrite_cached_tokens(data, b"3") == (data, b"")


@pytest.mark.parametrize("cut", range(1, len(USAGE_EVENT)))
def test_a_field_split_across_two_reads_is_still_found(cut: int) -> None:
    first, second = USAGE_EVENT[:cut], USAGE_EVENT[cut:]
    out1, carry = rewrite_cached_tokens(first, b"32", final=False)
    assert len(carry) <= len(FIELD) + 2  # never more than the field and its number are held back
    out2, carry = rewrite_cached_tokens(carry + second, b"32", final=False)
    assert carry == b""  # the stream's last read ends an event: nothing left behind
    assert out1 + out2 == USAGE_EVENT.replace(b'"cached_tokens":40', b'"cached_tokens":32')


def test_p_s_count_from_its_answer() -> None:
    assert prefill_cached_tokens({"usage": {"prompt_tokens_details": {"cached_tokens": 16}}}) == 16
    assert prefill_cached_tokens({"usage": {"prompt_tokens": 3}}) == 0  # vLLM leaves the field out at 0
    assert prefill_cached_tokens({"usage": {"prompt_tokens_details": None}}) == 0
    assert prefill_cached_tokens({"choices": []}) is None
    assert prefill_cached_tokens(None) is None
    assert prefill_cached_tokens({"usage": {"prompt_tokens_details": {"cached_tokens": "x"}}}) == 0


def test_which_streams_carry_usage() -> None:
    assert usage_in_stream({"stream_options": {"include_usage": True}})
    assert usage_in_stream({"stream_options": {"continuous_usage_stats": True}})
    assert not usage_in_stream({"stream_options": {"include_usage": False}})
    assert not usage_in_stream({})


def test_p_s_count_from_its_raw_answer_json_or_stream() -> None:
    """A concurrent plan's P answer, read whole: vLLM's JSON, SGLang's JSON or its stream (P streams when the
    client does), SGLang's native meta_info; None when P told nothing usable."""
    usage = {"prompt_tokens": 40, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 16}}
    assert answer_cached_tokens(orjson.dumps({"choices": [], "usage": usage})) == 16
    assert answer_cached_tokens(b' {"usage": {"prompt_tokens": 40}}') == 0  # left out at 0
    assert answer_cached_tokens(orjson.dumps({"text": "x", "meta_info": {"cached_tokens": 3}})) == 3
    stream = (b'data: {"choices":[{"text":" a"}],"usage":null}\n\n'
              b'data: ' + orjson.dumps({"choices": [], "usage": usage}) + b'\n\ndata: [DONE]\n\n')
    assert answer_cached_tokens(stream) == 16
    assert answer_cached_tokens(b'data: {"choices":[{"text":" a"}]}\n\ndata: [DONE]\n\n') is None  # no usage
    assert answer_cached_tokens(b'data: {"usage": {bad\n\n') is None
    assert answer_cached_tokens(b"{not json") is None
    assert answer_cached_tokens(b"[1, 2]") is None
    assert answer_cached_tokens(b"") is None
