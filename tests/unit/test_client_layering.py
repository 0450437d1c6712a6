"""pdproxy.client sits at the bottom of the dependency order and never pulls in aiohttp."""

from __future__ import annotations

import subprocess
import sys


def test_client_imports_nothing_of_pdproxy_above_it_nor_aiohttp() -> None:
    code = (
        "import sys, pdproxy.client\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('pdproxy', 'aiohttp')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    loaded = out.stdout.split()
    assert "pdproxy.client" in loaded
    assert [m for m in loaded if m != "pdproxy" and not m.startswith("pdproxy.client")] == []
