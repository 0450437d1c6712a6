"""Model discovery: which models an upstream serves, read from its `/v1/models` with each health probe.

An upstream whose model was configured is never asked. The names are read after a good health probe and
before the probe's verdict is applied, so an upstream added at runtime (warming) knows its models before it
gets its first request. A failed or malformed answer keeps the names known so far: the health probe, not
this, decides whether the upstream is fit for traffic.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from pdproxy.client import CallError, UpstreamClient
from pdproxy.health import Probe
from pdproxy.upstreams import Upstream, check_model_name

MODELS_PATH = "/v1/models"
MODELS_MAX_BYTES = 1024 * 1024  # vLLM lists its base model names and LoRA adapters: far below this
MAX_MODELS_PER_UPSTREAM = 256


def model_entries(body: bytes) -> list[dict[str, object]] | None:
    """The entries with a string `id` of a `/v1/models` answer, in its order; None when it is not one."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        return None
    return [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]


def served_names(body: bytes) -> tuple[str, ...] | None:
    """The `data[].id` of a `/v1/models` answer, in its order (vLLM: base names, then LoRA adapters); None when
    it is not one."""
    entries = model_entries(body)
    if entries is None:
        return None
    names: dict[str, None] = {}
    for entry in entries[:MAX_MODELS_PER_UPSTREAM]:
        try:
            names[check_model_name(str(entry["id"]))] = None
        except ValueError:
            continue
    return tuple(names) or None


def discovering_probe(probe: Probe, client: Callable[[], UpstreamClient | None], *, timeout: float,
                      headers: bytes, changed: Callable[[Upstream], None]) -> Probe:
    """`probe`, then (when it passed and the upstream's model was not configured) GET /v1/models; `changed`
    is told when an upstream's names differ from what was known. `headers`: the upstream API key, if any."""

    async def probe_and_discover(upstream: Upstream) -> str | None:
        error = await probe(upstream)
        if error is not None or upstream.models_fixed:
            return error
        upstreams = client()
        assert upstreams is not None, "probes run only while the application runs"
        try:
            resp = await upstreams.fetch(upstream.url, "GET", MODELS_PATH, headers=headers, timeout=timeout,
                                         max_bytes=MODELS_MAX_BYTES)
        except CallError:
            return None  # healthy all the same; the names are read again at the next probe
        names = served_names(resp.body) if resp.status == 200 else None
        if names is not None and names != upstream.models and not upstream.models_fixed:
            upstream.models = names  # (an admin may have fixed them during the await: checked again above)
            changed(upstream)
        return None

    return probe_and_discover
