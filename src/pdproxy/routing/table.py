"""The host's shared routing table: one memory-mapped file, one writer row per worker, read by all.

Why this shape: a decision must see every worker's leases and prefix decisions within about a
millisecond, and the request path must take no lock. So each worker writes only its own row (its
in-flight requests and estimated tokens per upstream) and its own ring of decisions; every
reader sums the rows and replays the rings. A value is one aligned 8-byte word, so a reader sees
either the old or the new value, never a torn one.

Layout, in signed 64-bit words:
    header    MAGIC, VERSION, workers, columns, feed_slots, 0, 0, 0
    row w     directory version, releases, directory[columns], in_flight[columns], tokens[columns]
    ring w    head, slots[feed_slots]

A row's directory maps columns to upstream keys (a hash of role and url, never 0); its writer
assigns them. A ring entry is `server key, n, key_1 .. key_n`: one decision's block keys. An entry
never wraps: the writer pads the end of the ring with a 0 word and starts again at slot 0. `head`
counts every slot ever written, so a reader knows when it was lapped.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
from pathlib import Path

MAGIC = 0x7064707278796C64  # "pdprxyld"
VERSION = 1
HEADER = 8
DEFAULT_COLUMNS = 128  # upstreams one worker may know at once (both roles), removed ones until their leases end
DEFAULT_FEED_SLOTS = 1 << 16  # words per worker ring: ~2000 decisions of 4k-character prompts
WORD = 8


def server_key(role: str, url: str) -> int:
    """A stable, non-zero key for an upstream, the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(f"{role} {url}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1  # 63 bits: a positive signed word


class SharedTable:
    """A mapping of the table file; `create` makes one (the supervisor), `attach` maps it (a worker)."""

    def __init__(self, path: Path, words: memoryview, mapping: mmap.mmap) -> None:
        self.path = path
        self.words = words
        self._mapping = mapping
        self.closed = False
        magic, version, self.workers, self.columns, self.feed_slots = words[0:5].tolist()
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not a pdproxy routing table of version {VERSION}")
        self.row_words = 2 + 3 * self.columns
        self._rows_base = HEADER
        self._feeds_base = HEADER + self.workers * self.row_words
        self.row_bases = [self._rows_base + w * self.row_words for w in range(self.workers)]

    @classmethod
    def create(cls, workers: int, *, columns: int = DEFAULT_COLUMNS, feed_slots: int = DEFAULT_FEED_SLOTS,
               directory: str | None = None) -> SharedTable:
        """A zeroed table in a new file (in /dev/shm when there is one: memory, never written to disk)."""
        if workers < 1 or columns < 1 or feed_slots < 64:
            raise ValueError("a routing table needs >= 1 worker, >= 1 column and >= 64 feed slots")
        size = (HEADER + workers * (2 + 3 * columns) + workers * (1 + feed_slots)) * WORD
        if directory is None and os.path.isdir("/dev/shm"):
            directory = "/dev/shm"
        fd, name = tempfile.mkstemp(prefix="pdproxy-routing-", dir=directory)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        words = memoryview(mapping).cast("q")
        words[0:5] = memoryview(bytearray(
            b"".join(v.to_bytes(8, "little", signed=True) for v in (MAGIC, VERSION, workers, columns, feed_slots))
        )).cast("q")
        return cls(Path(name), words, mapping)

    @classmethod
    def attach(cls, path: Path | str) -> SharedTable:
        """Map an existing table file (ValueError when it is not one)."""
        with open(path, "r+b") as file:
            size = os.fstat(file.fileno()).st_size
            if size < HEADER * WORD:
                raise ValueError(f"{path} is not a pdproxy routing table")
            mapping = mmap.mmap(file.fileno(), size)
        return cls(Path(path), memoryview(mapping).cast("q"), mapping)

    def row_base(self, worker: int) -> int:
        """Index of worker `worker`'s row (its directory version word)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} outside the table's {self.workers} rows")
        return self._rows_base + worker * self.row_words

    def feed_base(self, worker: int) -> int:
        """Index of worker `worker`'s ring (its head word)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} outside the table's {self.workers} rings")
        return self._feeds_base + worker * (1 + self.feed_slots)

    def clear_row(self, worker: int) -> None:
        """Forget a dead worker's leases: its process is gone, and so are its requests.

        Called by the supervisor once the process has exited (the row's writer is gone, so nobody
        races it), and by a worker when it starts. The ring keeps its head (readers stay in step)."""
        base = self.row_base(worker)
        words = self.words
        words[base + 2:base + self.row_words] = memoryview(bytes(WORD * (self.row_words - 2))).cast("q")
        words[base] += 1  # directory changed: readers look their columns up again

    def close(self) -> None:
        self.closed = True
        self.words.release()
        self._mapping.close()

    def unlink(self) -> None:
        """Remove the file (the supervisor, at the end); mappings stay valid until closed."""
        self.path.unlink(missing_ok=True)
