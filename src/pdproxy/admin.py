"""`/admin/upstreams`: list, add, drain, remove and re-weight upstreams at runtime.

Never open by accident: with `--admin-token` every call needs `Authorization: Bearer <token>`
(compared in constant time); without one, only loopback clients that did not come through
another proxy are served. Every input is validated before anything changes.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pdproxy.errors import Forbidden, InvalidRequest, NotFound, PayloadTooLarge, Unauthorized
from pdproxy.http.request import Request
from pdproxy.http.response import Response, json_response
from pdproxy.http.router import Router
from pdproxy.membership import Membership
from pdproxy.settings import describe_validation_error
from pdproxy.upstreams import MAX_WEIGHT, Role, Upstream, normalize_url

MAX_ADMIN_BODY = 64 * 1024
MAX_BULK = 256
_FORWARDED = ("X-Forwarded-For", "Forwarded", "X-Real-IP")

Handler = Callable[[Request], Awaitable[Response]]


class AddUpstream(BaseModel):
    """`POST /admin/upstreams` body (or one item of a list)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    url: StrictStr
    weight: StrictInt = Field(1, ge=1, le=MAX_WEIGHT)
    max_in_flight: StrictInt | None = Field(None, ge=0, le=1_000_000)
    skip_warmup: StrictBool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return normalize_url(value)


class PatchUpstream(BaseModel):
    """`PATCH /admin/upstreams/{id}` body."""

    model_config = ConfigDict(extra="forbid")

    weight: StrictInt | None = Field(None, ge=1, le=MAX_WEIGHT)
    drain: StrictBool | None = None

    @model_validator(mode="after")
    def _something(self) -> PatchUpstream:
        if self.weight is None and self.drain is None:
            raise ValueError("give 'weight' and/or 'drain'")
        return self


class AdminApi:
    """Handlers for the admin routes, behind `authorize`."""

    def __init__(self, membership: Membership, *, token: str | None, default_caps: Mapping[Role, int]) -> None:
        self.membership = membership
        self._token = token.encode() if token else None
        self._default_caps = default_caps

    def add_routes(self, router: Router) -> None:
        guard = self._guarded
        router.add("GET", "/admin/upstreams", guard(self.list_upstreams))
        router.add("POST", "/admin/upstreams", guard(self.add))
        router.add("DELETE", "/admin/upstreams", guard(self.delete_by_url))
        router.add("DELETE", "/admin/upstreams/{id}", guard(self.delete))
        router.add("PATCH", "/admin/upstreams/{id}", guard(self.patch))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                self.authorize(request)
                response = await handler(request)
                await self.membership.flush()  # an answer means the change is on disk
                return response
            except (InvalidRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge) as exc:
                return exc.response()

        return guarded

    def authorize(self, request: Request) -> None:
        """Raise unless the caller may use the admin API."""
        authorize(request, self._token)

    async def list_upstreams(self, request: Request) -> Response:
        return _json({"upstreams": [self._view(u) for u in self.membership.members()]})

    async def add(self, request: Request) -> Response:
        payload = await _read_json(request)
        items = payload if isinstance(payload, list) else [payload]
        if not items or len(items) > MAX_BULK:
            raise InvalidRequest(f"send one upstream or a list of 1 to {MAX_BULK}")
        specs = [_validate(AddUpstream, item, f"upstream {i}" if isinstance(payload, list) else "upstream")
                 for i, item in enumerate(items)]
        results = []
        for spec in specs:  # all validated first: a bad item changes nothing
            cap = spec.max_in_flight if spec.max_in_flight is not None else self._default_caps[spec.role]
            upstream, created = self.membership.add(spec.role, spec.url, weight=spec.weight, max_in_flight=cap,
                                                    skip_warmup=spec.skip_warmup)
            results.append({**self._view(upstream), "created": created})
        status = 201 if any(r["created"] for r in results) else 200
        body = {"upstreams": results} if isinstance(payload, list) else {"upstream": results[0]}
        return _json(body, status)

    async def delete(self, request: Request) -> Response:
        return self._remove(self._by_id(request), request)

    async def delete_by_url(self, request: Request) -> Response:
        role, url = request.query().get("role"), request.query().get("url")
        if role not in ("prefill", "decode") or not url:
            raise InvalidRequest("give ?role=prefill|decode&url=<upstream url>, or DELETE /admin/upstreams/{id}")
        try:
            upstream = self.membership.find(Role(role), normalize_url(url))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if upstream is None:
            raise NotFound(f"no {role} upstream {url}")
        return self._remove(upstream, request)

    def _remove(self, upstream: Upstream, request: Request) -> Response:
        force = request.query().get("force", "false").lower() in ("1", "true", "yes")
        removed = self.membership.remove(upstream, force=force)
        if removed:
            return _json({"upstream": self._view(upstream), "removed": True})
        return _json({"upstream": self._view(upstream), "removed": False,
                      "message": f"draining: removed once its {upstream.in_flight} requests in flight finish"},
                     202)

    async def patch(self, request: Request) -> Response:
        upstream = self._by_id(request)
        change = _validate(PatchUpstream, await _read_json(request), "change")
        if change.weight is not None:
            self.membership.set_weight(upstream, change.weight)
        if change.drain is not None:
            self.membership.set_drained(upstream, change.drain)
        return _json({"upstream": self._view(upstream)})

    def _by_id(self, request: Request) -> Upstream:
        upstream = self.membership.get(request.match_info["id"])
        if upstream is None:
            raise NotFound(f"no upstream with id {request.match_info['id']!r}")
        return upstream

    def _view(self, upstream: Upstream) -> dict[str, Any]:
        return {**upstream.describe(), "removing": self.membership.removing(upstream)}


def authorize(request: Request, token: bytes | None) -> None:
    """Raise Unauthorized or Forbidden unless the caller may use the admin API (here or in the
    supervisor of worker processes): the bearer `token` when there is one, else loopback only."""
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise Unauthorized("the admin API needs 'Authorization: Bearer <admin token>'")
        return
    if not _is_loopback(request.remote) or any(request.headers.get(name) is not None for name in _FORWARDED):
        raise Forbidden("the admin API answers only loopback clients unless --admin-token is set")


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


async def _read_json(request: Request) -> Any:
    raw = request.body
    if len(raw) > MAX_ADMIN_BODY:
        raise PayloadTooLarge(f"admin requests are limited to {MAX_ADMIN_BODY} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def _validate(model: type[Any], item: Any, what: str) -> Any:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid {what}: {describe_validation_error(exc)}") from None


def _json(body: Any, status: int = 200) -> Response:
    return json_response(body, status)
