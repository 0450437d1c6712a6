"""Pass-through routes: a request forwarded unchanged to one routable server of a pool (`/v1/models`)."""

from __future__ import annotations

from collections.abc import Callable

from pdproxy.client import CallError, UpstreamClient
from pdproxy.errors import Unavailable
from pdproxy.http.response import Response
from pdproxy.policies import Balancer
from pdproxy.proxy.calls import check_status, translate
from pdproxy.upstreams import Lease, Upstream, UpstreamPool


class _NoPrompt:
    """Routing input for requests without a prompt."""

    def prompt_prefix(self, limit: int) -> str:
        return ""


_NO_PROMPT = _NoPrompt()


class Passthrough:
    """Forwards a whole request to a routable member of `pool` and its whole answer back."""

    def __init__(self, *, pool: UpstreamPool, policy: Balancer, client: UpstreamClient, timeout: float,
                 max_answer_bytes: int, on_release: Callable[[Upstream], None]) -> None:
        self.pool = pool
        self.policy = policy
        self.client = client
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self._on_release = on_release

    async def forward(self, method: str, path: str, headers: bytes, request_id: str, body: bytes = b"") -> Response:
        side = self.pool.role.value
        candidates = self.pool.routable()
        if not candidates:
            raise Unavailable(f"no routable {side} upstream", side=side)
        upstream = self.policy.choose(candidates, _NO_PROMPT)
        lease = Lease(upstream, self._on_release)
        try:
            resp = await self.client.fetch(upstream.url, method, path, headers=headers, body=body,
                                           timeout=self.timeout, max_bytes=self.max_answer_bytes)
        except CallError as exc:
            raise translate(exc, side=side, upstream=upstream.url, stage=path.strip("/").replace("/", "_"),
                            timeout=self.timeout) from None
        finally:
            lease.release()
        content_type = resp.headers.get("content-type", "application/json")
        if resp.status >= 300 and not 400 <= resp.status < 500:
            check_status(resp.status, content_type, resp.body, side=side, upstream=upstream.url)
        return Response(status=resp.status, body=resp.body, content_type=content_type,
                        headers=(("X-Request-Id", request_id),))
