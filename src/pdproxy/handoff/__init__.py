"""The handoff registry: `--kv-adapter NAME` -> its Handoff."""

from __future__ import annotations

from typing import Any

from pdproxy.handoff.base import FetchJson, Handoff, MetadataError, Plan, UpstreamCall
from pdproxy.handoff.omni import OmniHandoff
from pdproxy.handoff.sglang import SglangHandoff
from pdproxy.handoff.vllm_mooncake import MooncakeHandoff
from pdproxy.handoff.vllm_nixl import VllmNixlHandoff
from pdproxy.handoff.vllm_nixl_push import NixlPushHandoff

HANDOFFS: dict[str, type[Any]] = {
    cls.name: cls for cls in (VllmNixlHandoff, OmniHandoff, SglangHandoff, MooncakeHandoff, NixlPushHandoff)
}
# Handoffs that read per-server metadata overrides (`handoff_meta`, keyed by upstream URL).
_TAKES_OVERRIDES = (SglangHandoff, MooncakeHandoff, NixlPushHandoff)

__all__ = ["HANDOFFS", "FetchJson", "Handoff", "MetadataError", "Plan", "UpstreamCall", "make_handoff"]


def make_handoff(
    name: str, overrides: dict[str, dict[str, Any]] | None = None, *, concurrent_ok: bool = False
) -> Handoff:
    """Build the named handoff; an unknown name raises ValueError listing the valid ones.

    `overrides` maps a normalised upstream URL to fixed metadata (SGLang's `bootstrap_port` or
    `bootstrap_host`, Mooncake's `bootstrap_port` or `bootstrap_addr`, NIXL push's `engine_id`,
    `kv_host`, `side_channel_port`, `tp_size`, `pp_size`) that wins over discovery.

    A concurrent handoff is refused (ValueError) unless the caller runs concurrent plans
    (`concurrent_ok=True`): a request path that waits for P first would deadlock against it."""
    handoff = HANDOFFS.get(name)
    if handoff is None:
        raise ValueError(f"unknown kv adapter {name!r}; valid adapters: {', '.join(sorted(HANDOFFS))}")
    if handoff.concurrent and not concurrent_ok:
        runnable = sorted(n for n, cls in HANDOFFS.items() if not cls.concurrent)
        raise ValueError(f"kv adapter {name!r} calls prefill and decode at once, which this build's request path "
                         f"does not do yet; usable now: {', '.join(runnable)}")
    if handoff in _TAKES_OVERRIDES:
        return handoff(overrides=overrides)  # type: ignore[no-any-return]
    return handoff()  # type: ignore[no-any-return]
