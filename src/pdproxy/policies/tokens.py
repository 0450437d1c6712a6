"""Prompt-token estimates for the token-aware policies: characters per token, or a real tokenizer.

A proxy sees text, not token ids. Counting characters is enough to rank servers (every estimate
is off by about the same factor); a tokenizer file makes the numbers real tokens, at the price of
tokenizing each prompt once per routing decision. `tokenizers` is an optional extra and is
imported only when a tokenizer file is configured; nothing is ever downloaded.
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class TokenCounter(Protocol):
    """Estimated number of prompt tokens in a text."""

    def count(self, text: str) -> int: ...


class CharTokenCounter:
    """About one token per `chars_per_token` characters (≈ 4 for English text and code with BPE)."""

    __slots__ = ("_chars_per_token",)

    def __init__(self, chars_per_token: float) -> None:
        if chars_per_token <= 0:
            raise ValueError("chars_per_token must be > 0")
        self._chars_per_token = chars_per_token

    def count(self, text: str) -> int:
        return math.ceil(len(text) / self._chars_per_token)


class TokenizerCounter:
    """Exact counts from a Hugging Face `tokenizer.json`, loaded from a local file."""

    __slots__ = ("_tokenizer",)

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str) -> TokenizerCounter:
        """Load `path`; ValueError (one line for the operator) when the library or the file is missing."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(
                "--tokenizer needs the `tokenizers` package: pip install 'pdproxy[tokenizer]'"
            ) from None
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # the library raises plain Exception for unreadable or invalid files
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise ValueError(f"cannot load tokenizer file {path}: {detail}") from None

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


class WordTokenCounter:
    """One token per whitespace-separated word: the mock engine's tokenization (`--tokenizer words`)."""

    __slots__ = ()

    def count(self, text: str) -> int:
        return len(text.split())


def make_token_counter(tokenizer: str | None, chars_per_token: float) -> TokenCounter:
    """A tokenizer-backed counter when a file is given, else the character estimate."""
    if tokenizer == "words":
        return WordTokenCounter()
    if tokenizer:
        return TokenizerCounter.from_file(tokenizer)
    return CharTokenCounter(chars_per_token)
