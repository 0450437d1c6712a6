"""Run the upstream client's, the malformed-HTTP and the half-close tests under both event loops the proxy supports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on CPython/Linux
    uvloop = None  # type: ignore[assignment]

_BOTH_LOOPS = ("test_client.py", "test_malformed_http.py", "test_half_close.py")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """test_client, test_malformed_http and test_half_close run on asyncio and uvloop; the rest on the default loop."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if item.path.name in _BOTH_LOOPS and uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories
