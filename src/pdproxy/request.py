"""`ProxyRequest`: one validated client request, as the flow and the policies see it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from pdproxy.served_models import ModelPools


@dataclass(slots=True)
class ProxyRequest:
    """A parsed client request. `body` is the client's JSON, never mutated."""

    endpoint: str  # "/v1/completions", "/v1/chat/completions" or "/inference/v1/generate"
    body: dict[str, Any]
    stream: bool
    request_id: str
    headers: bytes  # header lines sent to both legs (X-Request-Id, Authorization, trace context), built once
    pools: ModelPools | None = None  # the pools serving its model, set once by the orchestrator before admission
    # The prompt tokens the last server chosen for it would still compute, as a cache-aware policy estimated
    # them (None: no policy knows). Read by `--pd-min-prompt-tokens` right after the decode choice.
    uncached_tokens: int | None = None

    def prompt_prefix(self, limit: int) -> str:
        """The first `limit` characters of the prompt; for chat, of the whole rendered conversation."""
        prompt = self.body.get("prompt")
        if prompt is None:
            prompt = self.body.get("token_ids")  # vLLM's tokens-in API
        if prompt is not None:
            return _render_prompt(prompt)[:limit]
        parts: list[str] = []
        size = 0
        for message in self.body.get("messages") or ():
            piece = f"{message.get('role', '')}\n{_render_content(message.get('content'))}\n"
            parts.append(piece)
            size += len(piece)
            if size >= limit:
                break
        return "".join(parts)[:limit]


def _render_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        return _render_prompt(prompt[0])
    return orjson.dumps(prompt).decode()


def _render_content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(
            part["text"] if isinstance(part, dict) and isinstance(part.get("text"), str)
            else orjson.dumps(part).decode()
            for part in content
        )
    return orjson.dumps(content).decode()
