"""The serving process's garbage-collector settings, checked in a fresh interpreter (the test runner's own
collector is left alone)."""

from __future__ import annotations

import subprocess
import sys

import orjson

from pdproxy.gc_tuning import OLDER_THRESHOLDS, YOUNG_THRESHOLD

PROBE = """
import gc, weakref, orjson
from pdproxy.gc_tuning import tune_for_serving

class Node:
    pass

def young_collections():
    return gc.get_stats()[0]["collections"]

def churn(n):  # garbage only the collector frees (a request's cycles: a task and its exception, ...)
    for i in range(n):
        d = {"id": i}
        d["self"] = d

start = young_collections()
churn(20_000)
default_runs = young_collections() - start

kept = [{"startup": i} for i in range(1000)]  # what start-up built and keeps
tune_for_serving()
frozen = gc.get_freeze_count()

start = young_collections()
churn(20_000)
tuned_runs = young_collections() - start

# A cycle is still found by the collector on its own once enough objects were allocated.
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
hold = [[i] for i in range(60_000)]  # net allocations past the young threshold
print(orjson.dumps({"threshold": gc.get_threshold(), "frozen": frozen, "kept": len(kept),
                    "default_runs": default_runs, "tuned_runs": tuned_runs,
                    "cycle_collected": gone() is None}).decode())
"""


def probe() -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=30)
    return orjson.loads(out.stdout)


def test_serving_process_collects_less_often_and_freezes_what_startup_built() -> None:
    result = probe()
    assert result["threshold"] == [YOUNG_THRESHOLD, *OLDER_THRESHOLDS]
    assert result["frozen"] >= result["kept"]  # start-up objects left out of every later collection
    assert result["default_runs"] >= 10  # CPython's default threshold (700): a young collection every ~800 here
    assert result["tuned_runs"] == 0  # 20,000 is under the tuned threshold


def test_cycles_are_still_collected_without_an_explicit_collect() -> None:
    assert probe()["cycle_collected"] is True
