"""`ProxyRequest.prompt_prefix`: what prefix-aware policies hash."""

from __future__ import annotations

from typing import Any

import pytest

from pdproxy.request import ProxyRequest


def completion(prompt: Any) -> ProxyRequest:
    return ProxyRequest("/v1/completions", {"model": "m", "prompt": prompt}, False, "req-1", {})


def chat(*messages: dict[str, Any]) -> ProxyRequest:
    return ProxyRequest("/v1/chat/completions", {"model": "m", "messages": list(messages)}, True, "req-2", {})


def test_completion_string() -> None:
    assert completion("hello world").prompt_prefix(100) == "hello world"
    assert completion("hello world").prompt_prefix(5) == "hello"


def test_completion_token_ids() -> None:
    prefix = completion([101, 2023, 318]).prompt_prefix(100)
    assert "101" in prefix and "2023" in prefix and "318" in prefix
    assert prefix.index("101") < prefix.index("2023") < prefix.index("318")
    assert completion([101, 2023, 318]).prompt_prefix(100) == prefix  # deterministic
    assert completion([101, 2023, 319]).prompt_prefix(100) != prefix
    assert len(completion(list(range(1000))).prompt_prefix(50)) == 50


def test_single_element_lists_are_the_prompt_itself() -> None:
    assert completion(["hello world"]).prompt_prefix(100) == completion("hello world").prompt_prefix(100)
    assert completion([[5, 6, 7]]).prompt_prefix(100) == completion([5, 6, 7]).prompt_prefix(100)
    assert completion([5]).prompt_prefix(100) != completion([6]).prompt_prefix(100)


def test_limit_is_honoured() -> None:
    text = "x" * 50 + "y" * 50
    for limit in (0, 1, 50, 99, 100, 500):
        assert completion(text).prompt_prefix(limit) == text[:limit]


def test_chat_renders_every_message_in_order() -> None:
    request = chat(
        {"role": "system", "content": "SYS-TEXT"},
        {"role": "user", "content": "USER-ONE"},
        {"role": "assistant", "content": "ASSIST-TWO"},
        {"role": "user", "content": "USER-THREE"},
    )
    prefix = request.prompt_prefix(10_000)
    positions = [prefix.index(part) for part in
                 ("system", "SYS-TEXT", "user", "USER-ONE", "assistant", "ASSIST-TWO", "USER-THREE")]
    assert positions == sorted(positions)


def test_chat_role_is_part_of_the_prefix() -> None:
    as_user = chat({"role": "user", "content": "same"}).prompt_prefix(100)
    as_system = chat({"role": "system", "content": "same"}).prompt_prefix(100)
    assert as_user != as_system


def test_chat_differing_only_in_the_last_message() -> None:
    history = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Q1"},
               {"role": "assistant", "content": "A1"}]
    one = chat(*history, {"role": "user", "content": "what is 2+2?"})
    two = chat(*history, {"role": "user", "content": "what is 3+3?"})
    assert one.prompt_prefix(4096) != two.prompt_prefix(4096)
    # with a short limit only the shared history counts: both land on the same key
    assert one.prompt_prefix(10) == two.prompt_prefix(10)


def test_chat_limit_is_honoured() -> None:
    messages = [{"role": "user", "content": f"message number {i} " * 10} for i in range(50)]
    full = chat(*messages).prompt_prefix(1_000_000)
    for limit in (0, 1, 7, 100, 1000, len(full)):
        prefix = chat(*messages).prompt_prefix(limit)
        assert prefix == full[:limit]
        assert len(prefix) == min(limit, len(full))


def test_chat_content_as_text_parts() -> None:
    as_parts = chat({"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                 {"type": "text", "text": "world"}]})
    as_string = chat({"role": "user", "content": "Hello world"})
    assert as_parts.prompt_prefix(100) == as_string.prompt_prefix(100)


def test_chat_non_text_parts_do_not_crash() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    request = chat({"role": "user", "content": [{"type": "text", "text": "look:"}, image,
                                                {"type": "input_audio", "input_audio": {"data": "BBB"}}]})
    prefix = request.prompt_prefix(1000)
    assert "look:" in prefix
    other = chat({"role": "user", "content": [{"type": "text", "text": "look:"},
                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64,CC"}}]})
    assert other.prompt_prefix(1000) != prefix  # a different image is a different prompt


@pytest.mark.parametrize("content", [None, "", [], {"weird": "object"}, 42, [{"type": "text", "text": None}]])
def test_chat_unusual_content(content: Any) -> None:
    prefix = chat({"role": "assistant", "content": content}, {"role": "user", "content": "next"}).prompt_prefix(200)
    assert "assistant" in prefix and "next" in prefix


def test_chat_message_without_role_or_content() -> None:
    prefix = chat({"content": "no role"}, {"role": "tool"}).prompt_prefix(200)
    assert "no role" in prefix and "tool" in prefix


def test_prompt_wins_when_both_are_present() -> None:
    body = {"prompt": "from prompt", "messages": [{"role": "user", "content": "from messages"}]}
    assert ProxyRequest("/v1/completions", body, False, "r", {}).prompt_prefix(100) == "from prompt"


def test_empty_request_gives_empty_prefix() -> None:
    assert ProxyRequest("/v1/chat/completions", {"model": "m"}, False, "r", {}).prompt_prefix(100) == ""
    assert chat().prompt_prefix(100) == ""


def test_prompt_prefix_does_not_mutate_the_body() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    request = chat(*messages)
    request.prompt_prefix(3)
    assert request.body == {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
