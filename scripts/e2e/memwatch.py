"""Sample the memory of the e2e stage's processes and keep the peak.

    python memwatch.py PGID_FILE OUT_JSON [INTERVAL_S]

PGID_FILE lists process-group ids (one per line, re-read at every sample, so groups started later
count too). Every sample sums PSS (proportional set size: shared pages split between the processes
that map them, so the sum is what the group really costs) and RSS over every process in those groups.
OUT_JSON is rewritten at each new peak. Runs until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def groups(pgid_file: Path) -> set[int]:
    try:
        return {int(line) for line in pgid_file.read_text().split() if line.strip().isdigit()}
    except OSError:
        return set()


def sample(pgids: set[int]) -> tuple[int, int, int]:
    """(PSS bytes, RSS bytes, process count) over every process whose group is in `pgids`."""
    pss = rss = count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) not in pgids:  # field 5 of /proc/PID/stat: the process group
                continue
            for line in Path(entry.path, "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
            count += 1
        except (OSError, ValueError, IndexError):
            continue  # the process ended while it was read
    return pss, rss, count


def main() -> None:
    pgid_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    peak = {"pss_bytes": 0}
    while True:
        pss, rss, count = sample(groups(pgid_file))
        if pss > peak["pss_bytes"]:
            peak = {"pss_bytes": pss, "rss_bytes": rss, "processes": count, "at": time.time()}
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(peak))
            os.replace(tmp, out)
        time.sleep(interval)


if __name__ == "__main__":
    main()
