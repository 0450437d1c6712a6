"""`/admin/upstreams`: list, add, drain, remove and re-weight upstreams at runtime.

Never open by accident: with `--admin-token` every call needs `Authorization: Bearer <token>`
(compared in constant time); without one, only loopback clients that did not come through
another proxy are served: a request with any proxy-forwarding header (`is_forwarded`) is refused,
since a local reverse proxy or sidecar would make every client look local. Every input is
validated before anything changes: host names, a cap on upstreams per role, and no upstream that
is one of this proxy's own listeners (a request loop).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
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

from pdproxy.errors import Conflict, Forbidden, InvalidRequest, NotFound, PayloadTooLarge, Unauthorized
from pdproxy.http.request import Request
from pdproxy.http.response import Response, json_response
from pdproxy.http.router import Router
from pdproxy.http.validate import listen_addresses_conflict
from pdproxy.membership import Membership
from pdproxy.settings import describe_validation_error
from pdproxy.upstreams import MAX_WEIGHT, Role, Upstream, check_model_name, normalize_url

MAX_ADMIN_BODY = 64 * 1024
MAX_BULK = 256
# Headers a proxy, load balancer, CDN or sidecar adds for the client behind it (lower case).
FORWARDING_HEADERS = frozenset({
    "via", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
    "x-forwarded-server", "x-forwarded-prefix", "x-real-ip", "x-client-ip", "true-client-ip",
    "cf-connecting-ip", "cf-connecting-ipv6", "fastly-client-ip", "x-cluster-client-ip", "x-original-forwarded-for",
    "x-proxyuser-ip", "x-envoy-external-address", "x-envoy-internal", "x-azure-clientip", "x-azure-socketip",
    "x-appengine-user-ip", "x-original-host", "x-original-url", "client-ip",
})
# ... and the families they come in: any x-forwarded-*, x-envoy-*, x-...-ip, ...client-ip, ...-connecting-ip.
_FORWARDING_PATTERN = re.compile(
    r"x-forwarded-.*|x-envoy-.*|x-(.*[-_])?(client|real|remote|user|socket|originating)?ip(v[46])?"
    r"|.*client-?ip(v[46])?|.*-connecting-ip(v[46])?")

Handler = Callable[[Request], Awaitable[Response]]


class AddUpstream(BaseModel):
    """`POST /admin/upstreams` body (or one item of a list)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    url: StrictStr
    weight: StrictInt = Field(1, ge=1, le=MAX_WEIGHT)
    max_in_flight: StrictInt | None = Field(None, ge=0, le=1_000_000)
    skip_warmup: StrictBool = False
    model: StrictStr | None = None  # the model it serves; None: read from its /v1/models by the health probe

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return normalize_url(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)


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

    def __init__(self, membership: Membership, *, token: str | None, default_caps: Mapping[Role, int],
                 listen_addresses: Callable[[], Iterable[tuple[str, int]]] = tuple,
                 local_hosts: Iterable[str] = ()) -> None:
        """`listen_addresses`: this proxy's own (host, port) listeners, asked at each call (ports
        bound to 0 are known only once they listen); `local_hosts`: other names of this machine."""
        self.membership = membership
        self._token = token.encode() if token else None
        self._default_caps = default_caps
        self._listen_addresses = listen_addresses
        self._local_hosts = tuple(local_hosts)

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
            except (InvalidRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, Conflict) as exc:
                return exc.response()

        return guarded

    def authorize(self, request: Request) -> None:
        """Raise unless the caller may use the admin API."""
        authorize_request(request, self._token)

    async def list_upstreams(self, request: Request) -> Response:
        return _json({"upstreams": [self._view(u) for u in self.membership.members()]})

    async def add(self, request: Request) -> Response:
        payload = await _read_json(request)
        items = payload if isinstance(payload, list) else [payload]
        if not items or len(items) > MAX_BULK:
            raise InvalidRequest(f"send one upstream or a list of 1 to {MAX_BULK}")
        specs = [_validate(AddUpstream, item, f"upstream {i}" if isinstance(payload, list) else "upstream")
                 for i, item in enumerate(items)]
        own = tuple(self._listen_addresses())
        for spec in specs:
            if listen_addresses_conflict(spec.url, own, self._local_hosts):
                raise InvalidRequest(f"upstream {spec.url} is this proxy's own listener: requests would loop "
                                     "back into it", param="url")
        new = Counter(role for role, url in {(s.role, s.url) for s in specs} if self.membership.find(role, url) is None)
        for role, count in new.items():
            if count > self.membership.room(role):
                raise Conflict(f"the {role.value} pool may hold {self.membership.max_per_role} upstreams "
                               f"(--max-upstreams) and has {len(self.membership.pools[role].members)}: "
                               f"{count} more do not fit; nothing was added")
        results = []
        for spec in specs:  # all validated first: a bad item changes nothing
            cap = spec.max_in_flight if spec.max_in_flight is not None else self._default_caps[spec.role]
            upstream, created = self.membership.add(spec.role, spec.url, weight=spec.weight, max_in_flight=cap,
                                                    skip_warmup=spec.skip_warmup,
                                                    models=(spec.model,) if spec.model else ())
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


def authorize(authorization: str | None, token: bytes | None, remote: str | None,
              headers: Iterable[str]) -> None:
    """Raise Unauthorized or Forbidden unless the caller may use the admin API (here or in the
    supervisor of worker processes): the bearer `token` when there is one, else a loopback
    `remote` whose request has no forwarding header. `headers`: the request's header names (a
    mapping of them works).

    `authorization` may hold any bytes the server decoded: they are compared as the bytes sent, so
    a malformed header is a 401, never a 500."""
    if token is not None:
        scheme, _, given = (authorization or "").partition(" ")
        offered = _raw_bytes(given.strip())
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered, token):
            raise Unauthorized("the admin API needs 'Authorization: Bearer <admin token>'")
        return
    if not _is_loopback(remote) or is_forwarded(headers):
        raise Forbidden("the admin API answers only loopback clients that come through no other proxy, unless "
                        "--admin-token is set")


def authorize_request(request: Request, token: bytes | None) -> None:
    """`authorize` for a request of pdproxy's HTTP server."""
    authorize(request.headers.get("Authorization"), token, request.remote, request.headers.keys())


def _raw_bytes(text: str) -> bytes:
    """The bytes a header value was decoded from: pdproxy's server decodes as latin-1 (one char per
    byte); a server that decodes UTF-8 escapes the bytes that are not as surrogates (aiohttp)."""
    for codec, errors in (("latin-1", "strict"), ("utf-8", "surrogateescape")):
        try:
            return text.encode(codec, errors)
        except UnicodeEncodeError:
            pass
    return text.encode("utf-8", "replace")  # any other lone surrogate: matches no token


def is_forwarded(headers: Iterable[str]) -> bool:
    """Whether any header name says the request came through a proxy (FORWARDING_HEADERS or one of
    their families: x-forwarded-*, x-envoy-*, x-...ip, ...client-ip, ...-connecting-ip)."""
    for name in headers:
        lower = name.lower()
        if lower in FORWARDING_HEADERS or _FORWARDING_PATTERN.fullmatch(lower):
            return True
    return False


def _is_loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address(remote) if remote is not None else None
    except ValueError:
        return False
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (a dual-stack listener)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


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
