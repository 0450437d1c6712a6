"""Upstream pools per served model: which prefill and decode pools serve a request's `model`.

Each upstream serves a tuple of model names, its primary name first: configured (`host:port@name`, the admin
API's `model`) or read from its `/v1/models` by the health probe (`pdproxy.model_discovery`). The table groups
the members of the role pools into one prefill and one decode `UpstreamPool` per name; every rebuild swaps in
new dicts in one assignment, so a request reads one consistent snapshot without locks.

- **One model** (every upstream whose names are known serves the same names, or none is known yet: the
  single-model deployments pdproxy always served): every request goes to the role pools themselves, its
  `model` unread; the engine judges the name, as before.
- **Several models**: a request's `model` picks its pools (one dict lookup). An unknown name is vLLM's 404
  (`The model \\`x\\` does not exist.`, type NotFoundError); a missing one is a 400, since vLLM serves its only
  model then and here there is none; an upstream whose names are not known yet gets no traffic until its
  probe reads them. Health, panic, caps and policies all act on the model's own members.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pdproxy.errors import InvalidRequest, ModelNotFound
from pdproxy.upstreams import Role, Upstream, UpstreamPool

log = logging.getLogger("pdproxy.models")

@dataclass(slots=True, frozen=True, eq=False)
class ModelPools:
    """The prefill and decode pools that serve one model (`model` None: the role pools of a one-model proxy).
    Compared and hashed by identity: each one is also its requests' line in the admission queue."""

    prefill: UpstreamPool
    decode: UpstreamPool
    model: str | None = None

    def find(self, role: Role, url: str) -> Upstream | None:
        return (self.prefill if role is Role.PREFILL else self.decode).find(url)


class ModelTable:
    """The request path's view of which pools serve which model; `rebuild()` after any change of membership
    or of a member's names (wired to Membership's hooks and to model discovery)."""

    def __init__(self, pools: Mapping[Role, UpstreamPool], *, panic_threshold: float = 0.0) -> None:
        self._pools = pools
        self._panic_threshold = panic_threshold
        self.everything = ModelPools(pools[Role.PREFILL], pools[Role.DECODE])
        self.single: ModelPools | None = self.everything  # set: one model, every request goes there unchecked
        self.by_name: dict[str, ModelPools] = {}
        self.default: ModelPools | None = None  # where a request without `model` goes (several models: nowhere)
        # One pool per distinct set of names: /v1/models asks one member of each and merges the answers.
        self.listing: tuple[UpstreamPool, ...] = ()
        self.rebuild()

    @property
    def names(self) -> list[str]:
        return sorted(self.by_name)

    def rebuild(self) -> None:
        """Group the members by the names they serve again; kept pool objects where nothing changed."""
        prefill, decode = self._pools[Role.PREFILL].members, self._pools[Role.DECODE].members
        groups = list(dict.fromkeys(u.models for u in (*prefill, *decode) if u.models))
        if len(groups) <= 1:
            was_single = self.single is not None
            self.single, self.default = self.everything, self.everything
            self.by_name = dict.fromkeys(groups[0] if groups else (), self.everything)
            self.listing = ()
            if not was_single:
                log.info("one model served (%s): every request goes to the role pools", ", ".join(self.names) or "?")
            return
        old = self.by_name if self.single is None else {}
        by_name: dict[str, ModelPools] = {}
        for name in dict.fromkeys(name for group in groups for name in group):
            p = tuple(u for u in prefill if name in u.models)
            d = tuple(u for u in decode if name in u.models)
            kept = old.get(name)
            if kept is not None and kept.prefill.members == p and kept.decode.members == d:
                by_name[name] = kept  # its pools' panic state carries on
            else:
                by_name[name] = ModelPools(self._pool(Role.PREFILL, p), self._pool(Role.DECODE, d), name)
        primaries = {group[0] for group in groups}
        listing = []
        for group in groups:
            members = [u for u in decode if u.models == group] or [u for u in prefill if u.models == group]
            listing.append(self._pool(Role.DECODE if members[0].role is Role.DECODE else Role.PREFILL, members))
        if self.single is not None:
            log.info("several models served (%s): each request goes to its model's pools", ", ".join(sorted(by_name)))
        # Assigned last and together: a request between two of these sees a table that routes consistently.
        self.listing = tuple(listing)
        self.default = by_name[next(iter(primaries))] if len(primaries) == 1 else None
        self.by_name = by_name
        self.single = None

    def _pool(self, role: Role, members: Iterable[Upstream]) -> UpstreamPool:
        return UpstreamPool(role, members, panic_threshold=self._panic_threshold)

    def resolve(self, model: object) -> ModelPools:
        """The pools for a request's `model` (the body's value, None when absent); ModelNotFound (404) for a
        name no upstream serves, InvalidRequest (400) for a missing or malformed one with several models."""
        single = self.single
        if single is not None:  # one model: no lookup at all
            return single
        if isinstance(model, str):
            pools = self.by_name.get(model)
            if pools is not None:
                return pools
            raise ModelNotFound(f"The model `{model}` does not exist.")
        if model is None:
            if self.default is not None:  # several names, one primary (aliases, LoRA adapters): vLLM's default
                return self.default
            raise InvalidRequest(f"'model' is required: this proxy serves several models ({', '.join(self.names)})",
                                 param="model")
        raise InvalidRequest("'model' must be a string", param="model")

    def describe(self) -> dict[str, object]:
        """Per model: its members' counts, for /health (several models only)."""
        return {
            name: {pool.role.value: {"routable": len(pool.healthy()), "total": len(pool.members)}
                   for pool in (pools.prefill, pools.decode)}
            for name, pools in sorted(self.by_name.items())
        }
