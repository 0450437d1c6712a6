"""Loaded (through PYTHONPATH) by the e2e stage's vLLM processes only: stops NIXL's progress thread
from spinning, so three engines fit on two cores.

NIXL's Python API (nixl 1.5.1) starts every agent with a UCX progress thread and a hard-coded progress
delay of 0, so that thread polls with a zero timeout: one core at 100% per vLLM worker, busy or idle
(seen with gdb: nixlUcxSharedThread::run -> ucp_worker_arm -> epoll_wait(timeout=0)). Three spinning
engines on a 2-core machine starve everything else: health probes took over 10 s, KV transfers up to
100 s, and the stage failed. With a 1 ms delay the thread sleeps in poll() on its event fd between
events (about 4% of a core per idle engine) and the stage passes.

Not fixed by this, and seen with or without it: now and then D pulls P's KV only after P's 30 s KV
lease ran out (P logs "Releasing expired KV blocks ... retrieved by 0 remote worker(s)", then
"Potentially invalid KV blocks ... were retrieved by a decode worker"). Nothing else is patched;
pdproxy never loads this.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_DELAY_US = int(os.environ.get("E2E_NIXL_PROGRESS_DELAY_US", "1000"))
_TARGETS = {"nixl_cu12._bindings", "nixl_cu13._bindings"}


def _patch(bindings: object) -> None:
    original = bindings.nixlAgent

    def nixlAgent(name, config, *args, **kwargs):  # keeps the binding's name
        if config.useProgThread and config.pthrDelay == 0:
            config.pthrDelay = _DELAY_US
        return original(name, config, *args, **kwargs)

    bindings.nixlAgent = nixlAgent


class _PatchNixlOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _DELAY_US > 0:
    sys.meta_path.insert(0, _PatchNixlOnImport())
