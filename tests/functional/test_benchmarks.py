"""Smoke runs of the benchmark harness: a few requests per system, the systems that are always there.

Speed lives in the benchmark, never here: these only check that the harness runs end to end (mock
engines, pdproxy, the load generator in both modes, the S4 stream fleet, /proc measurements, the
JSON and Markdown report) and stops everything it started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "harness.py"


def run_harness(tmp_path: Path, systems: str, workloads: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--tiny", "--systems", systems, "--workloads", workloads,
         "--out", str(tmp_path), "--no-plot", "--no-install", "--retry-disturbed", "0",
         "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(tmp_path / "tiny.json") in done.stdout
    results: dict[str, Any] = json.loads((tmp_path / "tiny.json").read_text())
    # Everything the harness started was stopped before it wrote its results.
    assert results["meta"]["left_running"] == []
    return results


def test_closed_loop_smoke_run(tmp_path: Path) -> None:
    results = run_harness(tmp_path, "direct-pd,pdproxy", "S1")
    spec = results["workloads"]["S1"]["spec"]
    s1 = results["workloads"]["S1"]["results"]
    for system in ("direct-pd", "pdproxy"):
        r = s1[system]
        assert r["status"] == "ok", r
        assert r["errors"] == 0, r["error_kinds"]
        assert r["ok"] == r["requests"] == spec["requests"]
        assert r["output_tokens"] == r["ok"] * spec["max_tokens"]
        assert r["ttft_ms"]["p50"] is not None and r["e2e_ms"]["p99"] >= r["ttft_ms"]["p50"]
    assert s1["pdproxy"]["cpu_s_per_1k"] is not None and s1["pdproxy"]["peak_rss_mib"] > 0
    assert "cpu_s_per_1k" not in s1["direct-pd"]

    targets = {t["target"]: t["result"] for t in results["targets"]}
    assert set(targets.values()) <= {"PASS", "FAIL", "n/a", "info"}
    report = (tmp_path / "tiny.md").read_text()
    assert "| pdproxy |" in report and "## Targets" in report


def test_scale_smoke_run(tmp_path: Path) -> None:
    results = run_harness(tmp_path, "pdproxy", "S4")
    s4 = results["workloads"]["S4"]
    r = s4["results"]["pdproxy"]
    assert r["status"] == "ok", r
    assert [step["open"] for step in r["steps"]] == s4["spec"]["steps"], r
    assert r["errors"] == 0
    last = r["steps"][-1]
    assert last["proxy_fds"] > 0 and last["proxy_rss_mib"] > 0 and "stopped" not in last


def test_soak_smoke_run(tmp_path: Path) -> None:
    """benchmarks/soak.py end to end in a few seconds: faults injected, the report written, nothing left running."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.03", "--warmup", "0.5",
         "--fault-every", "0.4", "--concurrency", "4", "--out", str(tmp_path), "--name", "tiny-soak"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    result: dict[str, Any] = json.loads((tmp_path / "tiny-soak.json").read_text())
    assert result["meta"]["left_running"] == []
    assert result["requests"] > 0 and result["samples"], result
    assert {s["fault"] for s in result["samples"]} >= {"kill P0", "P1 answers 500 x20"}
    assert result["end"]["requests_in_flight"] == 0 and result["end"]["upstream_in_flight"] == 0
    assert "| requests |" in (tmp_path / "tiny-soak.md").read_text()
    assert done.returncode == (0 if result["rss_flat"] and result["fds_flat"] else 1), done.stderr[-2000:]
