#!/usr/bin/env python3
"""Regenerate README's configuration table and config/pdproxy.example.{yaml,toml} from the settings model.

Usage: python scripts/gen_settings_docs.py [--check]   (--check: exit 1 and name the stale files, write nothing)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pdproxy.settings_docs import stale_files, write_files  # noqa: E402


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_files(REPO)
        for path in stale:
            print(f"stale: {path.relative_to(REPO)} (run: python scripts/gen_settings_docs.py)")
        return 1 if stale else 0
    for path in write_files(REPO):
        print(f"rewrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
