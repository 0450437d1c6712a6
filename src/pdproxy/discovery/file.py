"""`file` discovery: a YAML or JSON list of upstreams that a job script (Slurm, Ray, a cron job) rewrites.

    prefill:
      - 10.0.0.11:8100
      - {url: http://10.0.0.12:8100, weight: 2}
    decode:
      - 10.0.0.21:8200
      - {url: 10.0.0.22:8200, ready: false}   # listed, drained

The file is checked every `interval` seconds (its inode, size and mtime: an atomic rename is a new inode)
and read again when it changed. A file that cannot be read or does not parse is a SourceFailure: the last
good list stays. Polling, not inotify, so it also works on network filesystems and needs no dependency.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pdproxy.discovery.base import SourceFailure, Target, Update, merge_targets
from pdproxy.upstreams import MAX_WEIGHT, Role, normalize_url


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)
    ready: bool = True

    @field_validator("url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_url(value)


class UpstreamsFile(BaseModel):
    """The whole file; a role left out has no upstreams from the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill: list[FileEntry] = []
    decode: list[FileEntry] = []

    @field_validator("prefill", "decode", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            return [_entry(item) for item in value]
        return value


def _entry(item: Any) -> Any:
    """`host:port=2` as in the server lists, or a mapping."""
    if isinstance(item, str):
        address, sep, weight = item.strip().rpartition("=")
        if sep and weight.isascii() and weight.isdigit():
            return {"url": address, "weight": int(weight)}
        return {"url": item}
    return item


def parse_upstreams_file(path: Path, raw: bytes) -> dict[Role, tuple[Target, ...]]:
    """The desired lists in `raw`; ValueError with a one-line reason when it is not a valid file."""
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} does not parse: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with prefill and decode lists")
    try:
        parsed = UpstreamsFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors())
        raise ValueError(f"{path}: {problems}") from None
    desired: dict[Role, tuple[Target, ...]] = {}
    for role, entries in ((Role.PREFILL, parsed.prefill), (Role.DECODE, parsed.decode)):
        urls = [entry.url for entry in entries]
        twice = sorted({url for url in urls if urls.count(url) > 1})
        if twice:
            raise ValueError(f"{path}: {role.value} lists {', '.join(twice)} twice")
        desired[role] = merge_targets([Target(e.url, e.weight, e.ready) for e in entries])
    return desired


class FileSource:
    """Watches one file; yields its lists at start and whenever it changes (and a failure when it breaks)."""

    name = "file"

    def __init__(self, path: Path, *, interval: float) -> None:
        self.path = path
        self.interval = interval

    async def updates(self) -> AsyncIterator[Update]:
        """Every look yields: the file's lists (re-read only when it changed), or a failure the first time
        a look fails. So the last-success time stays fresh while the file is good, and ages while it is bad."""
        seen: tuple[int, int, int] | None = None
        good: Update | None = None  # the lists of the file as it is now, if it parsed
        failed: str | None = None
        while True:
            try:
                info = os.stat(self.path)
            except OSError as exc:
                seen, good = None, None
                update: Update | None = SourceFailure(f"cannot read {self.path}: {exc.strerror or exc}")
            else:
                stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
                if stamp != seen:
                    seen = stamp
                    update = await asyncio.to_thread(self._read)
                    good = None if isinstance(update, SourceFailure) else update
                else:
                    update = good
            if isinstance(update, SourceFailure):
                if update.reason != failed:  # once per distinct problem, not at every look
                    failed = update.reason
                    yield update
            elif update is not None:
                failed = None
                yield update
            await asyncio.sleep(self.interval)

    def _read(self) -> Update:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            return SourceFailure(f"cannot read {self.path}: {exc.strerror or exc}")
        try:
            return parse_upstreams_file(self.path, raw)
        except ValueError as exc:
            return SourceFailure(str(exc))
