"""Runtime membership: add, drain, remove and re-weight upstreams while traffic flows.

Every change replaces a pool's member tuple in one assignment (a request reads one
snapshot, no locks), goes through the StateBoard for states, and is persisted when a
state file is configured. Removal is a drain: the upstream takes no new requests, and
leaves the pool when its last lease comes back (`lease_released`, called by the flow).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdproxy.health import StateBoard
from pdproxy.upstreams import (
    ADMIN,
    CONFIGURED,
    MAX_WEIGHT,
    Role,
    State,
    Upstream,
    UpstreamPool,
    check_model_name,
    normalize_url,
)

log = logging.getLogger("pdproxy.membership")

STATE_FILE_VERSION = 1


MAX_UPSTREAMS = 1024  # per role unless told otherwise (--max-upstreams)


class StateFileError(Exception):
    """The state file cannot be read or is not what pdproxy writes; the message says why."""


class MembershipFull(Exception):
    """Adding would take a pool over its cap (`max_per_role`); nothing was changed."""


@dataclass(slots=True, frozen=True)
class MemberSpec:
    """One upstream as the state file stores it."""

    role: Role
    url: str
    weight: int = 1
    max_in_flight: int = 0
    drained: bool = False
    models: tuple[str, ...] = ()  # configured model names; () when read from the upstream's /v1/models


@dataclass(slots=True)
class Hooks:
    """What else must follow a membership change (wired by the app; no-ops by default)."""

    watch: Callable[[Upstream], None] = lambda upstream: None  # start health probes
    unwatch: Callable[[Upstream], None] = lambda upstream: None
    cut_streams: Callable[[Upstream, str], int] = lambda upstream, reason: 0
    forget: Callable[[Upstream], None] = lambda upstream: None  # drop its metric series
    changed: Callable[[str], None] = lambda action: None  # count admin changes
    regroup: Callable[[], None] = lambda: None  # members or their model names changed: rebuild the model table


class Membership:
    """The only writer of pool membership."""

    def __init__(self, pools: Mapping[Role, UpstreamPool], board: StateBoard, *, warmup: bool,
                 state_file: Path | None = None, hooks: Hooks | None = None,
                 max_per_role: int = MAX_UPSTREAMS) -> None:
        self.pools = pools
        self.max_per_role = max_per_role  # bounds every per-request scan of a pool and /metrics
        self._board = board
        self._warmup = warmup
        self._state_file = state_file
        self.hooks = hooks or Hooks()
        self._removing: set[str] = set()  # ids draining towards removal (not merely paused)
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None
        board.listen(lambda upstream, old, new, reason: self._recheck_panic(upstream.role))

    def _recheck_panic(self, role: Role) -> None:
        """A state or the membership changed: the pool logs entering or leaving panic now, not at its
        next request."""
        self.pools[role].check_panic()

    def members(self) -> list[Upstream]:
        return [u for pool in self.pools.values() for u in pool.members]

    def get(self, upstream_id: str) -> Upstream | None:
        return next((u for u in self.members() if u.id == upstream_id), None)

    def find(self, role: Role, url: str) -> Upstream | None:
        return self.pools[role].find(url)

    def removing(self, upstream: Upstream) -> bool:
        return upstream.id in self._removing

    def room(self, role: Role) -> int:
        """How many more upstreams the `role` pool may take."""
        return max(0, self.max_per_role - len(self.pools[role].members))

    def add(self, role: Role, url: str, *, weight: int = 1, max_in_flight: int = 0,
            skip_warmup: bool = False, by: str = ADMIN, models: tuple[str, ...] = ()) -> tuple[Upstream, bool]:
        """Add an upstream; (upstream, created). Re-adding one that exists is harmless: a draining
        one is taken back, a new weight, cap or model is applied. `by` (admin, or a discovery source's name)
        becomes a new upstream's `source`. `models`: the names it serves, () to read them from its /v1/models.
        MembershipFull when the pool is full."""
        existing = self.find(role, url)
        if existing is not None:
            existing.weight, existing.max_in_flight = weight, max_in_flight
            if models and models != existing.models:
                existing.models, existing.models_fixed = models, True
                self.hooks.regroup()
            if existing.state is State.DRAINING:
                self._removing.discard(existing.id)
                self._board.set(existing, State.UNKNOWN, "added again while draining")
            self.save()
            return existing, False
        if not self.room(role):
            raise MembershipFull(f"the {role.value} pool already has {self.max_per_role} upstreams "
                                 "(--max-upstreams); remove one first")
        state = State.WARMING if self._warmup and not skip_warmup else State.UNKNOWN
        upstream = Upstream(role, url, weight, max_in_flight, state=state, source=by, models=models,
                            models_fixed=bool(models))
        self.pools[role].add(upstream)
        self.hooks.regroup()
        self._recheck_panic(role)
        log.info("%s upstream %s added by %s (%s, weight %d)", role.value, url, by, state.value, weight)
        self.hooks.watch(upstream)
        self._changed(by, "add")
        self.save()
        self._board.notify()
        return upstream, True

    def remove(self, upstream: Upstream, *, force: bool = False, by: str = ADMIN) -> bool:
        """Drain then remove; with `force`, remove now and cut its open streams. True once removed."""
        if force:
            cut = self.hooks.cut_streams(upstream, f"decode upstream {upstream.url} was removed by an operator")
            self._detach(upstream, f"removed at once, {cut} open streams cut")
            self._changed(by, "force_remove")
            return True
        self._removing.add(upstream.id)
        self._board.set(upstream, State.DRAINING, "removal requested: draining" if by == ADMIN
                        else f"gone from {by} discovery: draining")
        self._changed(by, "remove")
        self.save()
        return self.lease_released(upstream)

    def set_drained(self, upstream: Upstream, drained: bool, *, by: str = ADMIN) -> None:
        """Pause (drain without removing) or resume an upstream."""
        who = "an operator" if by == ADMIN else f"{by} discovery (not ready)"
        if drained:
            self._board.set(upstream, State.DRAINING, f"drained by {who}")
        elif upstream.state is State.DRAINING:
            self._removing.discard(upstream.id)
            self._board.set(upstream, State.UNKNOWN, f"undrained by {who.removesuffix(' (not ready)')}")
        self._changed(by, "drain" if drained else "undrain")
        self.save()

    def set_weight(self, upstream: Upstream, weight: int, *, by: str = ADMIN) -> None:
        upstream.weight = weight
        self._changed(by, "update")
        self.save()

    def _changed(self, by: str, action: str) -> None:
        """The admin-changes metric counts the admin API only; discovery counts its own."""
        if by == ADMIN:
            self.hooks.changed(action)

    def lease_released(self, upstream: Upstream) -> bool:
        """Called on every lease release: finish a removal once the upstream is idle. True if removed."""
        if upstream.in_flight == 0 and upstream.id in self._removing:
            self._detach(upstream, "drained: removed")
            return True
        return False

    def _detach(self, upstream: Upstream, reason: str) -> None:
        self._removing.discard(upstream.id)
        self.pools[upstream.role].remove(upstream)
        self.hooks.regroup()
        self._board.set(upstream, State.REMOVED, reason)  # the panic re-check follows the state change
        self.hooks.unwatch(upstream)
        self.hooks.forget(upstream)
        self.save()
        self._board.notify()

    # -- persistence ---------------------------------------------------------------------------

    def save(self) -> None:
        """Persist the membership, off the event loop: one writer at a time, always the latest snapshot."""
        if self._state_file is None:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_latest())

    def save_now(self) -> None:
        """Persist synchronously: at start-up, before any traffic."""
        if self._state_file is not None:
            self._write(self._snapshot())

    async def flush(self) -> None:
        """Return once every change so far is on disk (the admin API answers after this)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_latest(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await asyncio.to_thread(self._write, self._snapshot())
            except OSError as exc:
                log.error("cannot write the state file %s: %s", self._state_file, exc)

    def _snapshot(self) -> bytes:
        specs = [
            {"role": u.role.value, "url": u.url, "weight": u.weight, "max_in_flight": u.max_in_flight,
             "drained": u.state is State.DRAINING, **({"models": list(u.models)} if u.models_fixed else {})}
            for u in self.members() if u.id not in self._removing and u.source in (CONFIGURED, ADMIN)
        ]  # discovered upstreams are not kept: their source lists them again at start-up
        return json.dumps({"version": STATE_FILE_VERSION, "upstreams": specs}, indent=2).encode()

    def _write(self, data: bytes) -> None:
        """Atomically: a temporary file, fsync, rename. A crash never leaves half a file."""
        assert self._state_file is not None
        temporary = self._state_file.with_name(self._state_file.name + ".tmp")
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self._state_file)


def read_state_file(path: Path) -> list[MemberSpec] | None:
    """The membership saved in `path`; None when the file does not exist yet."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read state file {path}: {exc.strerror or exc}") from None
    try:
        data: Any = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != STATE_FILE_VERSION:
            raise ValueError(f"expected an object with version {STATE_FILE_VERSION}")
        return [_spec(item) for item in data["upstreams"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFileError(
            f"state file {path} is corrupt ({exc}); fix or remove it (pdproxy never drops it silently)"
        ) from None


def _spec(item: Any) -> MemberSpec:
    if not isinstance(item, dict):
        raise ValueError("each upstream must be an object")
    weight, cap, drained = item.get("weight", 1), item.get("max_in_flight", 0), item.get("drained", False)
    models = item.get("models", [])
    if not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT or not isinstance(cap, int) or cap < 0 \
            or not isinstance(drained, bool) or not isinstance(models, list) \
            or not all(isinstance(name, str) for name in models):
        raise ValueError(f"bad weight, max_in_flight, drained or models in {item}")
    return MemberSpec(Role(item["role"]), normalize_url(item["url"]), weight, cap, drained,
                      tuple(check_model_name(name) for name in models))
