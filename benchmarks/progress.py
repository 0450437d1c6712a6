"""A progress bar on stderr: tqdm when it is installed, else a plain counter that rewrites one line."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """`update(n)` / `set(value)` / `close()`; never raises, never writes to stdout."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "req") -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.value = 0
        self._bar: Any = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                         mininterval=0.25)

    def update(self, n: int = 1) -> None:
        self.set(self.value + n)

    def set(self, value: int, postfix: str = "") -> None:
        if not self.enabled:
            self.value = value
            return
        if self._bar is not None:
            self._bar.update(value - self.value)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self.value = value
            return
        self.value = value
        now = time.monotonic()
        if now - self._last >= 0.25 or value >= self.total:
            self._last = now
            extra = f" {postfix}" if postfix else ""
            print(f"\r  {self.desc}: {value}/{self.total}{extra}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            print(f"\r  {self.desc}: {self.value}/{self.total}   ", file=sys.stderr, flush=True)
