"""The handoff registry: `--kv-adapter NAME` -> its Handoff."""

from __future__ import annotations

from pdproxy.handoff.base import Handoff, Plan, UpstreamCall
from pdproxy.handoff.vllm_nixl import VllmNixlHandoff

HANDOFFS: dict[str, type[Handoff]] = {cls.name: cls for cls in (VllmNixlHandoff,)}

__all__ = ["HANDOFFS", "Handoff", "Plan", "UpstreamCall", "make_handoff"]


def make_handoff(name: str) -> Handoff:
    """Build the named handoff; an unknown name raises ValueError listing the valid ones."""
    handoff = HANDOFFS.get(name)
    if handoff is None:
        raise ValueError(f"unknown kv adapter {name!r}; valid adapters: {', '.join(sorted(HANDOFFS))}")
    return handoff()
