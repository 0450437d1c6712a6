"""Chart of a harness run: per workload, throughput and TTFT p99 of every system; for S4, the open
streams each system reached and its proxy RSS per open stream.

    python benchmarks/plot.py benchmarks/results/benchmark.json benchmarks/results/benchmark.png

Needs matplotlib (benchmarks/harness.py runs this with a Python that has it; never a pdproxy dependency).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"direct-pd": "#7f7f7f", "pdproxy": "#1f77b4", "nginx": "#2ca02c", "vllm-router": "#d62728",
          "sglang-router": "#9467bd"}


def panel(ax: Any, systems: list[str], results: dict[str, Any], value: Callable[[dict[str, Any]], float | None],
          title: str, ylabel: str, fmt: str = "{:,.0f}") -> None:
    """One bar per system (skipped or failed systems get a label instead of a bar)."""
    for i, system in enumerate(systems):
        r = results.get(system)
        v = value(r) if r and r.get("status") == "ok" else None
        if v is None:
            ax.text(i, 0, "skipped" if r and r.get("status") == "skipped" else "–", ha="center", va="bottom",
                    fontsize=7, rotation=90, color="#555555")
            continue
        ax.bar(i, v, 0.7, color=COLORS.get(system, "#333333"))
        ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_xticks(range(len(systems)), systems, rotation=35, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.margins(y=0.18)


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(source.read_text())
    systems = list(data["systems"])
    workloads = data["workloads"]
    closed = [w for w, e in workloads.items() if not e["spec"].get("steps")]
    scale = [w for w, e in workloads.items() if e["spec"].get("steps")]
    columns = len(closed) + len(scale)
    fig, axes = plt.subplots(2, columns, figsize=(3.3 * columns, 6.6), squeeze=False)
    for col, w in enumerate(closed):
        results = workloads[w]["results"]
        panel(axes[0][col], systems, results, lambda r: r["requests_per_second"], f"{w}: throughput", "requests / s")
        panel(axes[1][col], systems, results, lambda r: r["ttft_ms"]["p99"], f"{w}: TTFT p99 (lower is better)",
              "ms", "{:,.1f}")
    for offset, w in enumerate(scale):
        col = len(closed) + offset
        results = workloads[w]["results"]
        top = max(workloads[w]["spec"]["steps"])

        def reached(r: dict[str, Any]) -> float | None:
            return max((s["open"] for s in r.get("steps", [])), default=None)

        def per_stream(r: dict[str, Any]) -> float | None:
            values = [s["rss_kib_per_stream"] for s in r.get("steps", []) if s.get("rss_kib_per_stream")]
            return values[-1] if values else None

        panel(axes[0][col], systems, results, reached, f"{w}: open streams reached (target {top:,})", "streams")
        axes[0][col].axhline(top, ls=":", color="black", lw=0.8)
        panel(axes[1][col], systems, results, per_stream, f"{w}: proxy RSS per open stream", "KiB", "{:,.1f}")
        axes[1][col].axhline(32, ls=":", color="black", lw=0.8)
    meta = data["meta"]
    fig.suptitle(f"pdproxy benchmark, {meta['mode']} run {meta['date'][:10]}: every process on one "
                 f"{meta['host']['cpus']}-CPU machine; compare systems within a panel", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(target, dpi=100)


if __name__ == "__main__":
    main()
