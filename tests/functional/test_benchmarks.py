"""Smoke run of the benchmark harness: a few requests per system, the systems that are always there.

Speed lives in the benchmark, never here: this only checks that the harness runs end to end (mock
engines, pdproxy, the load generator in both modes, the S4 stream fleet, /proc measurements, the
JSON and Markdown report) and stops everything it started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "harness.py"


def test_harness_smoke_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--tiny", "--systems", "direct-pd,pdproxy", "--workloads", "S1,S4",
         "--out", str(tmp_path), "--no-plot", "--no-install", "--retry-disturbed", "0",
         "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(tmp_path / "tiny.json") in done.stdout

    results = json.loads((tmp_path / "tiny.json").read_text())
    s1 = results["workloads"]["S1"]["results"]
    for system in ("direct-pd", "pdproxy"):
        r = s1[system]
        assert r["status"] == "ok", r
        assert r["errors"] == 0, r["error_kinds"]
        assert r["ok"] == r["requests"] == results["workloads"]["S1"]["spec"]["requests"]
        assert r["output_tokens"] == r["ok"] * results["workloads"]["S1"]["spec"]["max_tokens"]
        assert r["ttft_ms"]["p50"] is not None and r["e2e_ms"]["p99"] >= r["ttft_ms"]["p50"]
    assert s1["pdproxy"]["cpu_s_per_1k"] > 0 and s1["pdproxy"]["peak_rss_mib"] > 0
    assert "cpu_s_per_1k" not in s1["direct-pd"]

    s4 = results["workloads"]["S4"]
    for system in ("direct-pd", "pdproxy"):
        r = s4["results"][system]
        assert r["status"] == "ok", r
        assert [step["open"] for step in r["steps"]] == s4["spec"]["steps"], r
        assert r["errors"] == 0
    assert s4["results"]["pdproxy"]["steps"][-1]["proxy_fds"] > 0

    names = {t["target"]: t["result"] for t in results["targets"]}
    assert all(result in ("PASS", "FAIL", "n/a") for result in names.values())
    report = (tmp_path / "tiny.md").read_text()
    assert "| pdproxy |" in report and "## Targets" in report

    # Everything the harness started was stopped before it wrote its results.
    assert results["meta"]["left_running"] == []
