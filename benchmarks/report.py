"""Summaries, the issue's targets (PASS/FAIL) and the Markdown report of a harness run (stdlib only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

KIB_PER_STREAM_LIMIT = 24.0
S4_TARGET_STREAMS = 16384


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of values in seconds, in milliseconds (None when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)
    n = len(ordered)

    def pick(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] * scale, 3)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(ordered[-1] * scale, 3),
            "mean": round(sum(ordered) / n * scale, 3)}


def _ok(result: dict[str, Any] | None) -> bool:
    return result is not None and result.get("status") == "ok"


def _result(results: dict[str, Any], workload: str, system: str) -> dict[str, Any] | None:
    return results.get("workloads", {}).get(workload, {}).get("results", {}).get(system)


def _why_missing(results: dict[str, Any], workload: str, *systems: str) -> str:
    if workload not in results.get("workloads", {}):
        return f"{workload} not run"
    for system in systems:
        r = _result(results, workload, system)
        if r is None:
            return f"{system} not run"
        if r.get("status") != "ok":
            return f"{system} {r.get('status')}"
    return "no data"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (issue 12), each PASS, FAIL or n/a (with why), computed from this run's ratios;
    plus how far pdproxy is from the bare-protocol floor (info)."""
    out: list[dict[str, Any]] = []

    def add(target: str, value: str, result: str) -> None:
        out.append({"target": target, "value": value, "result": result})

    def cpu_ratio(w: str, other: str, limit: float | None) -> None:
        p, v = _result(results, w, "pdproxy"), _result(results, w, other)
        name = f"{w}: pdproxy CPU per request <= {limit:g}x {other}'s" if limit else \
            f"{w}: pdproxy CPU per request, x the {other}'s"
        if _ok(p) and _ok(v) and (p.get("cpu_s_per_1k") == 0 or v.get("cpu_s_per_1k") == 0):
            add(name, "CPU time below /proc's 10 ms resolution: run more requests", "n/a")
        elif _ok(p) and _ok(v) and p.get("cpu_s_per_1k") and v.get("cpu_s_per_1k"):
            ratio = p["cpu_s_per_1k"] / v["cpu_s_per_1k"]
            add(name, f"{ratio:.2f}x ({p['cpu_s_per_1k']:.3f} vs {v['cpu_s_per_1k']:.3f} CPU s/1k req)",
                ("PASS" if ratio <= limit else "FAIL") if limit else "info")
        else:
            add(name, _why_missing(results, w, "pdproxy", other), "n/a")

    def throughput_ratio(w: str, other: str, floor: float) -> None:
        p, v = _result(results, w, "pdproxy"), _result(results, w, other)
        name = f"{w}: pdproxy throughput >= {floor:g}x {other}'s"
        if _ok(p) and _ok(v) and v["requests_per_second"]:
            ratio = p["requests_per_second"] / v["requests_per_second"]
            add(name, f"{ratio:.2f}x ({p['requests_per_second']:.0f} vs {v['requests_per_second']:.0f} req/s)",
                "PASS" if ratio >= floor else "FAIL")
        else:
            add(name, _why_missing(results, w, "pdproxy", other), "n/a")

    def ttft_added(w: str, other: str, limit_ms: float, what: str) -> None:
        p, d = _result(results, w, "pdproxy"), _result(results, w, other)
        name = f"{w} ({what}): TTFT p50 added over {other}'s <= {limit_ms:g} ms"
        if _ok(p) and _ok(d) and p["ttft_ms"]["p50"] is not None and d["ttft_ms"]["p50"] is not None:
            added = p["ttft_ms"]["p50"] - d["ttft_ms"]["p50"]
            add(name, f"{added:+.2f} ms ({p['ttft_ms']['p50']:.2f} vs {d['ttft_ms']['p50']:.2f} ms)",
                "PASS" if added <= limit_ms else "FAIL")
        else:
            add(name, _why_missing(results, w, "pdproxy", other), "n/a")

    cpu_ratio("S1", "vllm-router", 0.75)
    throughput_ratio("S1", "vllm-router", 1.0)
    cpu_ratio("S2", "vllm-router", 0.9)
    ttft_added("S2", "vllm-router", 5.0, "256 open streams")
    cpu_ratio("S3", "vllm-router", 0.6)
    throughput_ratio("S3", "vllm-router", 1.0)
    ttft_added("L1", "direct-pd", 1.0, "not saturated")
    for w in ("S1", "S2", "S3", "L1"):
        cpu_ratio(w, "floor", None)

    s4 = _result(results, "S4", "pdproxy")
    spec_steps = results.get("workloads", {}).get("S4", {}).get("spec", {}).get("steps", [])
    names = (f"S4: {S4_TARGET_STREAMS:,} concurrent open streams through pdproxy",
             "S4: zero errors", f"S4: proxy RSS per open stream <= {KIB_PER_STREAM_LIMIT:g} KiB")
    if not _ok(s4) or not s4.get("steps"):
        for n in names:
            add(n, _why_missing(results, "S4", "pdproxy"), "n/a")
    else:
        steps = s4["steps"]
        top = max(spec_steps) if spec_steps else 0
        best = max(s["open"] for s in steps)
        if top < S4_TARGET_STREAMS:
            add(names[0], f"this run's top step is {top} (reached {best})", "n/a")
        else:
            add(names[0], f"{best:,} open", "PASS" if best >= S4_TARGET_STREAMS else "FAIL")
        errors = sum(s["errors"] for s in steps)
        last = steps[-1]
        add(names[1], f"{errors} errors over {len(steps)} steps (last step: {last['open']}/{last['target']})",
            "PASS" if errors == 0 and last["open"] >= last["target"] else "FAIL")
        measured = [s for s in steps if s.get("rss_kib_per_stream") is not None]
        if measured:
            worst = measured[-1]
            kib = worst["rss_kib_per_stream"]
            add(names[2], f"{kib:.1f} KiB at {worst['open']:,} streams", "PASS" if kib <= KIB_PER_STREAM_LIMIT
                else "FAIL")
        else:
            add(names[2], "no step with open streams", "n/a")
    return out


# ------------------------------------------------------------------------------------------------ text


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _errors(result: dict[str, Any]) -> str:
    n = result.get("errors", 0)
    if not n:
        return "0"
    kinds = result.get("error_kinds") or {}
    return f"{n} ({', '.join(f'{k}: {v}' for k, v in kinds.items())})"


def _pct(result: dict[str, Any]) -> str:
    share = result.get("others_cpu_share")
    return "–" if share is None else f"{share:.0%}"


def one_line(result: dict[str, Any]) -> str:
    if result.get("status") not in ("ok", "proxy died"):
        return f"{result.get('status')}: {result.get('reason')}"
    text = (f"{result['requests_per_second']:.1f} req/s, TTFT p50 {_f(result['ttft_ms']['p50'], 2)} ms "
            f"p99 {_f(result['ttft_ms']['p99'], 2)} ms, {result['errors']} errors")
    if result.get("others_cpu_share") is not None:
        text += f", others used {result['others_cpu_share']:.0%} of the CPUs"
    if result.get("cpu_s_per_1k") is not None:
        text += f", proxy CPU {result['cpu_s_per_1k']:.3f} s/1k req, peak RSS {result['peak_rss_mib']} MiB"
    return text


def closed_table(workload: dict[str, Any]) -> str:
    rows = workload["results"]
    direct = rows.get("direct-pd") if _ok(rows.get("direct-pd")) else None
    head = ("| system | req/s | × direct-pd | out tok/s | TTFT p50 / p90 / p99 ms | TTFT p50 added | "
            "e2e p50 / p90 / p99 ms | gap p50 / p99 ms | errors | CPU s / 1k req | peak RSS MiB | others' CPU |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in rows.items():
        if r.get("status") not in ("ok", "proxy died"):
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} ||||||||||| ")
            continue
        ratio = (f"{r['requests_per_second'] / direct['requests_per_second']:.2f}"
                 if direct and direct["requests_per_second"] else "–")
        added = (f"{r['ttft_ms']['p50'] - direct['ttft_ms']['p50']:+.2f} ms"
                 if direct and name != "direct-pd" and r["ttft_ms"]["p50"] is not None
                 and direct["ttft_ms"]["p50"] is not None else "–")
        t, e, g = r["ttft_ms"], r["e2e_ms"], r["itl_ms"]
        status = "" if r["status"] == "ok" else " (proxy died)"
        lines.append(
            f"| {name}{status} | {_f(r['requests_per_second'])} | {ratio} | {_f(r['output_tokens_per_second'], 0)} | "
            f"{_f(t['p50'], 2)} / {_f(t['p90'], 2)} / {_f(t['p99'], 2)} | {added} | "
            f"{_f(e['p50'], 1)} / {_f(e['p90'], 1)} / {_f(e['p99'], 1)} | {_f(g['p50'], 2)} / {_f(g['p99'], 2)} | "
            f"{_errors(r)} | {_f(r.get('cpu_s_per_1k'), 3)} | {_f(r.get('peak_rss_mib'))} | {_pct(r)} |")
    spread = []
    for name, r in rows.items():
        if r.get("runs"):
            each = ", ".join(f"{_f(x['requests_per_second'], 0)} req/s" + (
                f" @ {x['cpu_s_per_1k']:.3f}" if x.get("cpu_s_per_1k") is not None else "") + (
                f" ({x['others_cpu_share']:.0%})" if x.get("others_cpu_share") is not None else "")
                for x in r["runs"] if x.get("status") == "ok")
            spread.append(f"{name}: {each}")
    if spread:
        lines += ["", "Every run (@ CPU s / 1k req, (others' share of the CPUs)); the table shows the least "
                  "disturbed one: " + "; ".join(spread) + "."]
    return "\n".join(lines)


def scale_table(workload: dict[str, Any]) -> str:
    lines = ["| system | step | open | errors | ramp s | first token p99 ms | gap p50 / p99 ms | proxy RSS MiB | "
             "KiB / stream | proxy fds (peak per process / limit) | listen overflows | others' CPU | stopped because |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for name, r in workload["results"].items():
        if r.get("status") not in ("ok", "proxy died"):
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')} |||||||||||| ")
            continue
        for step in r.get("steps", []):
            kinds = {**step["failed"], **{f"dropped: {k}": v for k, v in step["dropped"].items()}}
            errors = str(step["errors"]) + (f" ({', '.join(f'{k}: {v}' for k, v in kinds.items())})" if kinds else "")
            fds = (f"{_f(step.get('proxy_fds'))} ({_f(step.get('proxy_fds_max_process'))} / "
                   f"{_f(step.get('proxy_fd_limit_per_process'))})" if "proxy_fds" in step else "–")
            notes = "; ".join(r.get("notes", [])) if step is r["steps"][0] and r.get("notes") else ""
            label = f"{name}" + (f" ({notes})" if notes else "")
            lines.append(
                f"| {label} | {step['target']:,} | {step['open']:,} | {errors} | {_f(step['ramp_seconds'])} | "
                f"{_f(step['open_ms']['p99'], 1)} | {_f(step['gap_ms']['p50'], 0)} / {_f(step['gap_ms']['p99'], 0)} | "
                f"{_f(step.get('proxy_rss_mib'))} | {_f(step.get('rss_kib_per_stream'))} | {fds} | "
                f"{_f(step.get('tcp', {}).get('ListenOverflows'))} | {_pct(step)} | {step.get('stopped', '')} |")
    return "\n".join(lines)


def targets_table(results: dict[str, Any]) -> str:
    lines = ["| target | this run | result |", "|---|---|---|"]
    for t in results.get("targets", []):
        mark = {"PASS": "**PASS**", "FAIL": "**FAIL**"}.get(t["result"], t["result"])
        lines.append(f"| {t['target']} | {t['value']} | {mark} |")
    return "\n".join(lines)


def markdown_tables(results: dict[str, Any]) -> str:
    parts = []
    for name, workload in results.get("workloads", {}).items():
        parts.append(f"### {name}: {workload['title']}\n")
        parts.append(scale_table(workload) if workload["spec"].get("steps") else closed_table(workload))
        parts.append("")
    parts.append("### Targets\n")
    parts.append(targets_table(results))
    return "\n".join(parts) + "\n"


def markdown(results: dict[str, Any], chart: str | None, chart_note: str | None = None) -> str:
    meta = results["meta"]
    host = meta["host"]
    lines = [
        f"# pdproxy benchmark ({meta['mode']} run, {meta['date']})",
        "",
        f"Host: {host['cpus']} CPUs ({host['cpu']}), Linux {host['kernel']}, Python {host['python']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in host['load_avg_at_start'])}"
        + (f", at end {', '.join(f'{x:.2f}' for x in meta['load_avg_at_end'])}" if meta.get("load_avg_at_end") else "")
        + f". pdproxy {meta['pdproxy_commit'] or '(no git)'}. Open files per process: {meta['fd_limit']['soft']}."
        f" Balancing policy of every proxy: `{meta['policy']}`.",
        "",
        "| system | version | what it is | status |",
        "|---|---|---|---|",
    ]
    for name, s in results["systems"].items():
        status = f"skipped: {s['skipped']}" if s.get("skipped") else "measured"
        lines.append(f"| {name} | {s.get('version') or '–'} | {s['description']} | {status} |")
    lines.append("")
    if chart:
        lines += [f"![throughput and TTFT p99 per system]({chart})", ""]
    elif chart_note:
        lines += [f"({chart_note})", ""]
    lines.append(markdown_tables(results).replace("### ", "## "))
    lines += [
        "Columns: req/s counts requests answered in full (status 200, streams ending in `data: [DONE]`); "
        "× direct-pd is the throughput ratio to the load generator doing the PD flow itself; TTFT is the time "
        "from sending the request (direct-pd: the prefill) to the first token event (non-streaming: to the first "
        "body byte); gaps are the times between token events as the client reads them (events that arrive "
        "together count as 0); CPU is user+system time of the proxy's process tree from /proc/PID/stat "
        "(children included) over the measured run, warm-up excluded; peak RSS is VmHWM summed over that tree. "
        "S4: a stream counts as open once its first token arrived; KiB / stream is (proxy RSS at the step "
        "- RSS before S4) / open streams; ramp is the time to open the step's new streams.",
        "",
    ]
    return "\n".join(lines)
