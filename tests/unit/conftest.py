from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def scratch_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Relative config paths resolve in a scratch directory, never in the checkout."""
    monkeypatch.chdir(tmp_path)
