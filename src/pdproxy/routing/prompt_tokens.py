"""The request side of exact routing: a request's prompt as the token ids the engine will cache.

vLLM tokenizes a completion's prompt with the model's special tokens (`add_special_tokens`
defaults to true), and renders a chat with the model's chat template (Hugging Face's
`apply_chat_template`: jinja2, `add_generation_prompt=True`), then tokenizes that text without
adding special tokens again: the template writes them. `HfPromptTokens` does the same from the
local `tokenizer.json` and the `chat_template` in the `tokenizer_config.json` beside it (or a
template file). `WordPromptTokens` is the mock engine's tokenization (a token per word), for tests
and benchmarks. A request it cannot render (token-id prompts aside) has no ids: the approximate
index decides for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from pdproxy.mock_kv_events import word_token_id

WORDS = "words"  # the --tokenizer value that selects the mock engine's tokenization


class PromptTokens(Protocol):
    def ids(self, body: dict[str, Any]) -> list[int] | None: ...


def _token_prompt(prompt: Any) -> list[int] | None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    return None


def _text_prompt(prompt: Any) -> str | None:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


class WordPromptTokens:
    """The mock engine's tokens: one per whitespace-separated word; chat as `role content` per message."""

    def ids(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if isinstance(messages, list):
            parts = []
            for message in messages:
                if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                    return None
                content = message.get("content")
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(f"{message['role']} {content or ''}")
            text = " ".join(parts)
        else:
            tokens = _token_prompt(body.get("prompt"))
            if tokens is not None:
                return [word_token_id(str(t)) for t in tokens]  # the mock reads ids as words
            text = _text_prompt(body.get("prompt"))  # type: ignore[assignment]
            if text is None:
                return None
        return [word_token_id(word) for word in text.split()]


class HfPromptTokens:
    """A Hugging Face tokenizer and chat template, loaded from local files (nothing is downloaded)."""

    def __init__(self, tokenizer: Any, template: str | None, special: dict[str, str]) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._template = None
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(  # as transformers renders chat templates
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent,
                                                                                ensure_ascii=False)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(template)

    @classmethod
    def from_files(cls, tokenizer_path: str, template_path: str | None = None) -> HfPromptTokens:
        """`tokenizer.json`, and the chat template from `template_path` or the tokenizer_config.json beside it."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the `tokenizers` package: pip install 'pdproxy[tokenizer]'") from None
        try:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        except Exception as exc:  # the library raises plain Exception for unreadable or invalid files
            raise ValueError(f"cannot load tokenizer file {tokenizer_path}: {' '.join(str(exc).split())}") from None
        config: dict[str, Any] = {}
        config_path = Path(tokenizer_path).with_name("tokenizer_config.json")
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {config_path}: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template_path:
            try:
                template = Path(template_path).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read chat template {template_path}: {exc}") from None
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(tokenizer, template if isinstance(template, str) else None, special)

    def render_chat(self, messages: list[Any]) -> str | None:
        if self._template is None:
            return None
        try:
            return str(self._template.render(messages=messages, add_generation_prompt=True, **self._special))
        except Exception:  # a template error (raise_exception, bad message shapes): no ids for this one
            return None

    def ids(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if isinstance(messages, list):
            text = self.render_chat(messages)
            if text is None:
                return None
            return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        tokens = _token_prompt(body.get("prompt"))
        if tokens is not None:
            return tokens
        prompt = _text_prompt(body.get("prompt"))
        if prompt is None:
            return None
        return list(self._tokenizer.encode(prompt, add_special_tokens=True).ids)


def _raise(message: str) -> None:
    raise ValueError(message)


def make_prompt_tokens(tokenizer: str | None, chat_template: str | None = None) -> PromptTokens | None:
    """The token source for KV-event routing: `words` (the mock's), a tokenizer file, or None."""
    if not tokenizer:
        return None
    if tokenizer == WORDS:
        return WordPromptTokens()
    return HfPromptTokens.from_files(tokenizer, chat_template)
