"""`--pd-min-prompt-tokens`: when disaggregation does not pay, D serves the request alone.

Moving KV from P to D costs a second request, a transfer and P's queue; for a prompt whose part
still to compute is small, D computing it locally is faster. As llm-d's prefix-based PD decider
does, the threshold is on the *uncached* part of the prompt on the chosen D (a long prompt D
already holds is cheap for D too).
"""

from __future__ import annotations

from typing import Literal

SkipReason = Literal["short_prompt", "cached_prompt"]


def skip_pd(prompt_tokens: int, estimated_uncached_tokens: int | None, threshold: int) -> SkipReason | None:
    """Why this request should skip P (the metric label), or None to disaggregate.

    `prompt_tokens` is the estimated prompt length; `estimated_uncached_tokens` what the chosen D
    would still compute (None when no prefix index knows: the whole prompt counts as uncached).
    `threshold` 0 turns skipping off.
    """
    if threshold <= 0:
        return None
    if prompt_tokens < threshold:
        return "short_prompt"
    uncached = prompt_tokens if estimated_uncached_tokens is None else min(estimated_uncached_tokens, prompt_tokens)
    if uncached < threshold:
        return "cached_prompt"
    return None
