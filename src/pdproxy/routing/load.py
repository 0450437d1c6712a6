"""In-flight requests and estimated tokens per upstream, summed over every worker of the host.

A worker writes its own counts into its row of the `SharedTable` and reads everyone's. One
`LoadCell` per (role, url) per worker, hung on each `Upstream` as `upstream.shared`: `Lease`
calls `acquire`/`release`, the policies read `in_flight()`/`tokens()`.

Caps across workers without a lock: a worker that picks a capped server first *reserves* a slot
(publishes its count + 1), then reads the total (Dekker's order: store, full fence, load). If
the total exceeds the cap it withdraws. Two workers racing for the last slot may both withdraw
(the request tries another server or waits), but both can never keep it. The fence is an
uncontended `threading.Lock` acquire: a locked instruction on x86, which orders the store
before the load; nothing else waits on that lock.

Tokens follow `ledger`'s rule: each decision appends its estimate; when a lease comes back the
oldest estimates beyond the leases out are dropped (a server's prefill queue runs FCFS).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque

from pdproxy.routing.table import SharedTable


class WorkerRow:
    """This worker's row: the only writer of it. Columns are given to cells and freed with them."""

    def __init__(self, table: SharedTable, worker: int) -> None:
        self.table = table
        self.worker = worker
        self._base = table.row_base(worker)
        columns = table.columns
        self._dir = self._base + 2
        self._in_flight = self._dir + columns
        self._tokens = self._in_flight + columns
        self._cells: weakref.WeakValueDictionary[int, LoadCell] = weakref.WeakValueDictionary()
        self._free = list(range(columns - 1, -1, -1))
        self._fence = threading.Lock()
        table.clear_row(worker)  # a previous process in this slot left counts its death voided

    def cell(self, key: int, leased: int = 0) -> LoadCell:
        """The cell of upstream `key` (one per key: an upstream removed and added again shares it)."""
        cell = self._cells.get(key)
        if cell is None:
            if not self._free:
                raise RuntimeError(f"the routing table's {self.table.columns} columns are all in use")
            column = self._free.pop()
            words = self.table.words
            words[self._in_flight + column] = 0
            words[self._tokens + column] = 0
            words[self._dir + column] = key
            words[self._base] += 1  # directory version: readers look columns up again
            cell = self._cells[key] = LoadCell(self, key, column, leased)
            weakref.finalize(cell, self._free_column, column).atexit = False  # at exit the row dies anyway
        return cell

    def _free_column(self, column: int) -> None:
        if self.table.closed:
            return
        words = self.table.words
        words[self._in_flight + column] = 0  # before the key goes: no reader counts a stale value
        words[self._tokens + column] = 0
        words[self._dir + column] = 0
        words[self._base] += 1
        self._free.append(column)

    def publish(self, column: int, in_flight: int, tokens: int) -> None:
        words = self.table.words
        words[self._in_flight + column] = in_flight
        words[self._tokens + column] = tokens

    def released(self) -> None:
        """Count a release, so the other workers' admission queues know to try again."""
        self.table.words[self._base + 1] += 1

    def fence(self) -> None:
        """Order this worker's stores before its next loads (see the module docstring)."""
        self._fence.acquire()
        self._fence.release()

    def releases(self) -> int:
        """Releases by every worker so far: it changing means capacity may be back somewhere."""
        table = self.table
        words = table.words
        return sum(words[base + 1] for base in table.row_bases)


class LoadCell:
    """One upstream's load in this worker, published to its row, and its total over all rows."""

    __slots__ = ("__weakref__", "_column", "_leased", "_reserved", "_row", "_seen", "_sizes", "_tokens", "key")

    def __init__(self, row: WorkerRow, key: int, column: int, leased: int) -> None:
        self.key = key
        self._row = row
        self._column = column
        self._leased = leased  # leases this worker holds on the server
        self._reserved = 0  # slots claimed by a decision whose lease is not taken yet
        self._sizes: deque[int] = deque()
        self._tokens = 0
        self._seen: list[tuple[int, int]] = [(-1, -1)] * row.table.workers  # (directory version, column)
        self._publish()

    # -- this worker's side (Lease and the policies) ------------------------------------------

    def acquire(self) -> None:
        if self._reserved:
            self._reserved -= 1  # the decision's reservation becomes this lease: the total is unchanged
        self._leased += 1
        self._publish()

    def release(self) -> None:
        self._leased = max(self._leased - 1, 0)
        self._trim()
        self._publish()
        self._row.released()

    def reserve(self) -> int:
        """Claim one more slot before the lease is taken; the total in flight, this claim included."""
        self._reserved += 1
        self._publish()
        self._row.fence()
        return self.in_flight()

    def withdraw(self) -> None:
        """Give back every reservation not turned into a lease (a refused or abandoned decision)."""
        if self._reserved:
            self._reserved = 0
            self._trim()
            self._publish()

    def add_tokens(self, tokens: int) -> None:
        self._sizes.append(tokens)
        self._tokens += tokens
        self._publish()

    def _trim(self) -> None:
        sizes = self._sizes
        while len(sizes) > self._leased + self._reserved:
            self._tokens -= sizes.popleft()

    def _publish(self) -> None:
        self._row.publish(self._column, self._leased + self._reserved, self._tokens)

    @property
    def local_in_flight(self) -> int:
        return self._leased + self._reserved

    # -- every worker's side -------------------------------------------------------------------

    def in_flight(self) -> int:
        return self._total(0)

    def tokens(self) -> int:
        return self._total(1)

    def _total(self, which: int) -> int:
        row = self._row
        table = row.table
        words = table.words
        columns = table.columns
        key = self.key
        seen = self._seen
        total = 0
        for worker, base in enumerate(table.row_bases):
            version, column = seen[worker]
            if words[base] != version or (column >= 0 and words[base + 2 + column] != key):
                version = words[base]
                directory = words[base + 2:base + 2 + columns].tolist()
                column = directory.index(key) if key in directory else -1
                seen[worker] = (version, column)
            if column >= 0:
                total += words[base + 2 + columns * (1 + which) + column]
        return total
