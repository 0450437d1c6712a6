"""KV-handoff adapters: how prefill and decode bodies look for one engine protocol.

An adapter never interprets the handle it carries: whatever the prefill engine
returns is passed to the decode engine unchanged (rewriting e.g. `remote_host`
breaks deployments whose KV side channel is not on the HTTP address).
"""

from __future__ import annotations

from typing import Any, Protocol


class KvAdapter(Protocol):
    """Builds the two legs of the PD flow from the client's body."""

    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body sent to the prefill engine."""
        ...

    def decode_body(self, body: dict[str, Any], prefill_response: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The body sent to the decode engine, and whether it carries a KV handle."""
        ...


# Only `do_remote_decode` matters to vLLM; the null keys are what its reference proxy sends.
_VLLM_PREFILL_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# Removed from the prefill body: vLLM rejects stream_options without stream, and min_tokens > max_tokens.
_PREFILL_DROPPED = ("stream_options", "min_tokens", "min_completion_tokens")


class VllmAdapter:
    """vLLM's `kv_transfer_params` protocol (NixlConnector pull mode, also used by Mooncake-style P→D)."""

    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        prefill = {key: value for key, value in body.items() if key not in _PREFILL_DROPPED}
        prefill["stream"] = False
        prefill["max_tokens"] = 1
        if "max_completion_tokens" in body:  # it wins over max_tokens for chat: P would generate otherwise
            prefill["max_completion_tokens"] = 1
        prefill["kv_transfer_params"] = dict(_VLLM_PREFILL_REQUEST)
        return prefill

    def decode_body(self, body: dict[str, Any], prefill_response: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        handle = prefill_response.get("kv_transfer_params")
        if handle is None:
            # P freed its blocks (abort, error, or not a PD engine): D recomputes the prompt.
            if "kv_transfer_params" in body:
                return {k: v for k, v in body.items() if k != "kv_transfer_params"}, False
            return body, False
        return {**body, "kv_transfer_params": handle}, True


ADAPTERS: dict[str, type[VllmAdapter]] = {"vllm": VllmAdapter}


def make_adapter(name: str) -> KvAdapter:
    """Build the named adapter; an unknown name raises ValueError listing the valid ones."""
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise ValueError(f"unknown kv adapter {name!r}; valid adapters: {', '.join(sorted(ADAPTERS))}")
    return adapter()
