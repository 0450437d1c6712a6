"""`skip_pd`: when a request goes to D alone."""

from __future__ import annotations

import pytest

from pdproxy.handoff.skip import skip_pd


@pytest.mark.parametrize(("prompt", "uncached", "threshold", "reason"), [
    (10, None, 0, None),  # off
    (10_000, 0, 0, None),  # off, even for a fully cached prompt
    (99, None, 100, "short_prompt"),
    (99, 99, 100, "short_prompt"),
    (100, None, 100, None),  # unknown cache: the whole prompt counts
    (100, 100, 100, None),  # exactly at the threshold: disaggregate
    (5000, 99, 100, "cached_prompt"),
    (5000, 100, 100, None),
    (5000, 0, 100, "cached_prompt"),
    (150, 9999, 100, None),  # an estimate above the prompt is capped at the prompt
])
def test_skip_pd(prompt: int, uncached: int | None, threshold: int, reason: str | None) -> None:
    assert skip_pd(prompt, uncached, threshold) == reason


def test_settings_parse_handoff_meta_and_the_threshold() -> None:
    from pdproxy.settings import Settings

    settings = Settings(prefill_servers="p:1", decode_servers="d:2", pd_min_prompt_tokens=256,
                        handoff_meta='{"10.0.0.1:8100": {"bootstrap_port": 9000}}')
    assert settings.pd_min_prompt_tokens == 256
    assert settings.handoff_meta == {"http://10.0.0.1:8100": {"bootstrap_port": 9000}}
    with pytest.raises(ValueError, match="pd_min_prompt_tokens"):
        Settings(prefill_servers="p:1", decode_servers="d:2", pd_min_prompt_tokens=-1)
