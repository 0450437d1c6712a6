"""The host's shared routing table with real processes: concurrent writers, a worker that dies and is
replaced, an upstream removed while its leases are out, caps reserved across workers, the decision feed."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdproxy.errors import CapsTaken
from pdproxy.policies import PolicyOptions, make_balancer
from pdproxy.policies.prefix_index import block_keys
from pdproxy.routing.feed import DecisionFeed
from pdproxy.routing.load import WorkerRow
from pdproxy.routing.share import SharedBalancer
from pdproxy.routing.table import SharedTable, server_key
from pdproxy.upstreams import Lease, Role, Upstream, UpstreamPool

URL = "http://10.0.0.1:8100"
KEY = server_key("prefill", URL)
CONTEXT = multiprocessing.get_context("fork")  # the children only map the table: fork is safe and fast


@pytest.fixture
def table(tmp_path: Path) -> Iterator[SharedTable]:
    shared = SharedTable.create(4, columns=8, feed_slots=256, directory=str(tmp_path))
    yield shared
    shared.close()
    shared.unlink()


def _writer(path: str, worker: int, cycles: int, hold: int, ready: multiprocessing.synchronize.Event,
            done: multiprocessing.synchronize.Event) -> None:
    """A worker: many leases taken and given back on one upstream, then `hold` kept until told to go."""
    table = SharedTable.attach(path)
    row = WorkerRow(table, worker)
    upstream = Upstream(Role.PREFILL, URL)
    upstream.shared = row.cell(KEY)
    feed = DecisionFeed(table, worker)
    for i in range(cycles):
        lease = Lease(upstream)
        upstream.shared.add_tokens(10)
        lease.release()
        if i % 50 == 0:
            feed.publish(KEY, [worker + 1, i + 1])
    held = [Lease(upstream) for _ in range(hold)]
    for _ in held:
        upstream.shared.add_tokens(100)
    ready.set()
    done.wait(10)


def _start(table: SharedTable, worker: int, hold: int, cycles: int = 2000) -> tuple[
        multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event, multiprocessing.synchronize.Event]:
    ready, done = CONTEXT.Event(), CONTEXT.Event()
    process = CONTEXT.Process(target=_writer, args=(str(table.path), worker, cycles, hold, ready, done))
    process.start()
    return process, ready, done


def test_concurrent_writers_sum_to_every_lease_held(table: SharedTable) -> None:
    reader = WorkerRow(table, 3)
    cell = reader.cell(KEY)
    feed = DecisionFeed(table, 3)
    children = [_start(table, worker, hold=worker + 1) for worker in range(3)]
    try:
        for _, ready, _ in children:
            assert ready.wait(5)
        assert cell.in_flight() == 1 + 2 + 3  # every worker's held leases, none of the given-back ones
        assert cell.tokens() == 100 * 6  # tokens of given-back requests were dropped on release
        seen: list[tuple[int, list[int]]] = []
        feed.drain(lambda server, keys: seen.append((server, keys)))
        assert sorted({keys[0] for _, keys in seen}) == [1, 2, 3] and all(s == KEY for s, _ in seen)
        assert len(seen) == 3 * 40 and feed.lost == 0  # 2000 / 50 entries each; 160 words fit a 256-word ring
    finally:
        for process, _, done in children:
            done.set()
            process.join(5)


def test_a_dead_worker_is_cleared_and_its_slot_reused(table: SharedTable) -> None:
    cell = WorkerRow(table, 0).cell(KEY)
    process, ready, _ = _start(table, 1, hold=3, cycles=0)
    assert ready.wait(5)
    assert cell.in_flight() == 3
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)  # no finally, no finalizer: its counts stay in its row
    process.join(5)
    assert cell.in_flight() == 3
    table.clear_row(1)  # what the supervisor does once it has reaped the process
    assert cell.in_flight() == 0 and cell.tokens() == 0
    replacement, ready, done = _start(table, 1, hold=1, cycles=10)
    try:
        assert ready.wait(5)
        assert cell.in_flight() == 1  # the new process writes the same row afresh
    finally:
        done.set()
        replacement.join(5)


def test_an_upstream_removed_while_leases_are_out(table: SharedTable) -> None:
    row, other = WorkerRow(table, 0), WorkerRow(table, 1)
    pool = UpstreamPool(Role.PREFILL)
    old = Upstream(Role.PREFILL, URL)
    old.shared = row.cell(KEY)
    pool.add(old)
    leases = [Lease(old) for _ in range(2)]
    watcher = other.cell(KEY)
    pool.remove(old)  # removed from membership: its leases are only given back
    new = Upstream(Role.PREFILL, URL)  # added again while the old leases are out
    new.shared = row.cell(KEY, new.in_flight)
    assert new.shared is old.shared and new.load == 2  # the server still runs those requests
    for lease in leases:
        lease.release()
    assert watcher.in_flight() == 0 and new.load == 0
    del old, new, leases, lease
    gc.collect()  # the last reference to the cell is gone: its column is free again
    assert KEY not in table.words[table.row_base(0) + 2:table.row_base(0) + 2 + table.columns].tolist()
    assert watcher.in_flight() == 0


def test_columns_run_out_with_a_clear_error(table: SharedTable) -> None:
    row = WorkerRow(table, 0)
    cells = [row.cell(server_key("prefill", f"http://h{i}:1")) for i in range(table.columns)]
    with pytest.raises(RuntimeError, match="columns are all in use"):
        row.cell(server_key("prefill", "http://one-more:1"))
    del cells


def test_a_reservation_that_loses_the_race_is_withdrawn(table: SharedTable) -> None:
    a, b = WorkerRow(table, 0).cell(KEY), WorkerRow(table, 1).cell(KEY)
    assert a.reserve() == 1
    assert b.reserve() == 2  # over a cap of 1: b must withdraw
    b.withdraw()
    assert a.in_flight() == 1
    a.acquire()  # the reservation becomes the lease: still one
    assert b.in_flight() == 1
    a.release()
    assert b.in_flight() == 0


def _policy(name: str) -> object:
    options = PolicyOptions(prefix_chars=256, vnodes=40, load_factor=0.25, block_chars=16, index_max_blocks=1000,
                            cache_weight=2.0, cache_load="tokens", chars_per_token=4.0)
    return make_balancer(name, options, rng=random.Random(1))


class _Prompt:
    def __init__(self, text: str) -> None:
        self.text = text

    def prompt_prefix(self, limit: int) -> str:
        return self.text[:limit]


async def test_caps_hold_across_workers_and_a_lost_race_is_caps_taken(table: SharedTable) -> None:
    rows = [WorkerRow(table, w) for w in range(2)]
    pools = [[Upstream(Role.PREFILL, URL, max_in_flight=1)] for _ in rows]
    balancers = [SharedBalancer(_policy("least_conn"), row) for row in rows]  # type: ignore[arg-type]
    chosen = balancers[0].choose(pools[0], _Prompt("x"))
    lease = Lease(chosen)
    assert pools[1][0].full is False  # not yet attached: worker 1 has not decided on it
    with pytest.raises(CapsTaken, match="at its in-flight cap"):  # admission waits on it
        balancers[1].choose(pools[1], _Prompt("x"))  # attached now: worker 0's lease fills the cap
    assert pools[1][0].full
    lease.release()
    assert not pools[1][0].full
    assert balancers[1].choose(pools[1], _Prompt("x")) is pools[1][0]
    await asyncio.sleep(0)  # the end of this step of the loop: the abandoned reservation is withdrawn
    assert pools[0][0].load == 0


def test_cache_aware_learns_the_other_workers_decisions(table: SharedTable) -> None:
    rows = [WorkerRow(table, w) for w in range(2)]
    urls = [f"http://10.0.0.{i}:8100" for i in range(4)]
    pools = [[Upstream(Role.PREFILL, url) for url in urls] for _ in rows]
    policies = [_policy("cache_aware") for _ in rows]
    balancers = [SharedBalancer(p, row, DecisionFeed(table, w))  # type: ignore[arg-type]
                 for w, (p, row) in enumerate(zip(policies, rows, strict=True))]
    document = "lorem ipsum dolor sit amet " * 40
    first = balancers[0].choose(pools[0], _Prompt(document + "first question"))
    lease = Lease(first)
    lease.release()  # done: no load difference left, only the cache
    second = balancers[1].choose(pools[1], _Prompt(document + "second question"))
    assert second.url == first.url  # worker 1 never saw this prefix itself
    assert policies[1].matched_blocks(second, _Prompt(document)) == len(block_keys(document, 16))  # type: ignore[attr-defined]


def test_a_reader_lapped_by_the_ring_skips_and_counts(table: SharedTable) -> None:
    writer, reader = DecisionFeed(table, 0), DecisionFeed(table, 1)
    for _ in range(200):
        writer.publish(KEY, list(range(1, 11)))  # 12 words each: the 256-word ring laps several times
    seen: list[int] = []
    assert reader.drain(lambda server, keys: seen.append(server)) == 0
    assert reader.lost == 1 and not seen
    writer.publish(KEY, [7])
    assert reader.drain(lambda server, keys: seen.append(keys[0])) == 1 and seen == [7]


def test_attach_refuses_a_file_that_is_not_a_table(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x01" * 4096)
    with pytest.raises(ValueError, match="not a pdproxy routing table"):
        SharedTable.attach(path)
