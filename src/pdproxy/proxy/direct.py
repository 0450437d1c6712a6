"""`--pd-min-prompt-tokens`: requests for which disaggregation does not pay go to their D alone.

The decision (`handoff.skip.skip_pd`) reads the prompt's estimated length and, when the decode
policy estimates it (cache_aware: its prefix index or the engines' KV events), the part of the
prompt the chosen D would still compute. A skipped request is a normal request to D: the
client's body minus every handoff field, no prefill, no KV handle; a D that fails before its
first byte is retried on another D (`flow_retries`), as in the PD flow. Off (the default),
none of this runs: the orchestrator wires it only when the threshold is set.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson

from pdproxy.errors import UpstreamError
from pdproxy.handoff import UpstreamCall
from pdproxy.handoff.base import without_handoff_fields
from pdproxy.handoff.skip import skip_pd
from pdproxy.http.request import Request
from pdproxy.http.response import Response
from pdproxy.policies.tokens import TokenCounter
from pdproxy.proxy.record import RequestRecord
from pdproxy.request import ProxyRequest
from pdproxy.upstreams import Lease, Upstream

if TYPE_CHECKING:
    from pdproxy.proxy.orchestrator import Orchestrator

WHOLE = sys.maxsize  # prompt_prefix(WHOLE): the whole prompt
#: (request, parsed request, record, the D leased at admission, the P chosen with it) -> the answer.
Flow = Callable[[Request, ProxyRequest, RequestRecord, Lease, Upstream], Awaitable["Response | None"]]


class SkipPd:
    """Wraps the PD flow: each request either runs it or goes to its admitted D alone."""

    __slots__ = ("_counter", "_orch", "_pd", "threshold")

    def __init__(self, orchestrator: Orchestrator, pd_flow: Flow, *, threshold: int, counter: TokenCounter) -> None:
        self._orch = orchestrator
        self._pd = pd_flow
        self.threshold = threshold
        self._counter = counter

    def reason(self, preq: ProxyRequest) -> str | None:
        """Why `preq` should skip P on the D chosen for it (the metric label), or None to disaggregate."""
        return skip_pd(self._counter.count(preq.prompt_prefix(WHOLE)), preq.uncached_tokens, self.threshold)

    async def run(self, request: Request, preq: ProxyRequest, record: RequestRecord, decode_lease: Lease,
                  prefill: Upstream) -> Response | None:
        why = self.reason(preq)
        if why is None:
            return await self._pd(request, preq, record, decode_lease, prefill)
        # `prefill` goes unused: never leased, a cap reservation its choice made is withdrawn on its own.
        orch = self._orch
        orch.metrics.pd_skipped.labels(why).inc()
        body = orjson.dumps(without_handoff_fields(preq.body))
        failed: list[Upstream] = []
        record.stage = "decode"
        try:
            while True:
                try:
                    # A call per attempt: D's leg drops its body once answered.
                    return await orch.run_decode(request, preq, UpstreamCall(preq.endpoint, body), record,
                                                 decode_lease.upstream, report=orch.report)
                except UpstreamError as exc:
                    fresh = orch.another_decoder(exc, decode_lease, failed, preq, record)
                    if fresh is None:
                        raise
                    decode_lease = fresh
        finally:
            decode_lease.release()
