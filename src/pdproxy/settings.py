"""Settings: parsed once, frozen, with precedence CLI > env `PDPROXY_*` > config file > defaults.

The CLI passes only the flags the user gave as init values; the config file
path comes from `--config` or `PDPROXY_CONFIG`, and may be YAML or TOML.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from pdproxy.http.limits import ServerLimits
from pdproxy.http.routes import PASSTHROUGH_PATHS
from pdproxy.upstreams import MAX_WEIGHT, check_model_name, normalize_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Settings groups: the sections of --help, the docs and the example files, and the sections a config file
# may nest settings in (`timeouts: {connect_timeout: 5}`). The model itself stays flat, so each setting keeps
# one flat name as CLI flag, env variable and config key.
UPSTREAMS = "upstreams"
LISTENING = "listening"
POLICIES = "policies"
HANDOFF = "handoff"
FAILOVER = "failover"
TIMEOUTS = "timeouts"
HEALTH = "health"
EJECTION = "ejection"
ADMISSION = "admission"
LIFECYCLE = "lifecycle"
REQUESTS = "requests"
LOGGING = "logging"
METRICS = "metrics"
ADMIN = "admin"
DISCOVERY = "discovery"
CLIENTS = "clients"
GROUP_TITLES = {
    UPSTREAMS: "upstreams", LISTENING: "listening", POLICIES: "load balancing (policies)",
    HANDOFF: "KV handoff", FAILOVER: "failover", TIMEOUTS: "timeouts", HEALTH: "active health checks",
    EJECTION: "passive ejection (outlier detection)", ADMISSION: "overload protection (admission)",
    LIFECYCLE: "lifecycle", REQUESTS: "requests", LOGGING: "logging", METRICS: "metrics",
    ADMIN: "admin API and runtime membership", DISCOVERY: "discovery (upstreams found without hand edits)",
    CLIENTS: "client-side limits (slow, broken and greedy clients)",
}


def setting(default: Any, *, description: str, group: str, doc: str | None = None,
            aliases: tuple[str, ...] = (), metavar: str | None = None, example: Any = None,
            default_text: str | None = None, repeatable: bool = False, **constraints: Any) -> Any:
    """The one definition of a setting: its default, constraints and every text about it.

    `description` is the one-line help (CLI --help, README table); `doc` the longer explanation of the
    example config file (default: the description). `aliases` are extra CLI flags besides `--<name>`;
    `example` is the value the example files show instead of the default; `default_text` says what
    the default means when its value alone does not (None: "the main port"); `repeatable` flags may be given
    more than once, each adding a value. The CLI, the README table and
    config/pdproxy.example.{yaml,toml} are generated from these (scripts/gen_settings_docs.py).
    """
    extra: dict[str, Any] = {"group": group}
    if doc is not None:
        extra["doc"] = doc
    if aliases:
        extra["aliases"] = list(aliases)
    if metavar is not None:
        extra["metavar"] = metavar
    if example is not None:
        extra["example"] = example
    if default_text is not None:
        extra["default_text"] = default_text
    if repeatable:
        extra["repeatable"] = True
    return Field(default, description=description, json_schema_extra=extra, **constraints)



class ConfigError(Exception):
    """A setting or the config file is wrong; the message is one line for the operator."""


class UpstreamSpec(BaseModel):
    """One configured server: `host:port` or `http(s)://host:port`, optionally `@model` (the model it
    serves; read from its /v1/models when not given) and `=weight`, e.g. `h:8100@llama-8b=2`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)
    model: str | None = None

    @field_validator("url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_url(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)

    @classmethod
    def parse(cls, text: str) -> UpstreamSpec:
        address, sep, weight = text.strip().rpartition("=")
        if sep and not (weight.isascii() and weight.isdigit()):
            raise ValueError(f"upstream {text!r}: weight after '=' must be a whole number")
        if not sep:
            address = text.strip()
        head, at, model = address.partition("@")  # normalize_url refuses user@host: '@' is free to mean this
        if at:
            try:
                normalize_url(head)
            except ValueError:  # `user:pw@host:port`: left whole, so its own error names the real problem
                at = ""
            else:
                address = head
        if at and not model:
            raise ValueError(f"upstream {text!r}: give a model name after '@'")
        return cls(url=address, weight=int(weight) if sep else 1, model=model if at else None)

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model,) if self.model else ()


def _split_servers(value: Any) -> Any:
    """Accept a comma list (CLI, env) or a list of strings / {url, weight} mappings (config file)."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return tuple(UpstreamSpec.parse(item) if isinstance(item, str) else item for item in value)
    return value


Servers = Annotated[tuple[UpstreamSpec, ...], NoDecode]


class Settings(BaseSettings):
    """Every knob of the proxy, each defined once with `setting(...)`: the CLI, the README table and the
    example config files are generated from these fields (scripts/gen_settings_docs.py)."""

    model_config = SettingsConfigDict(env_prefix="PDPROXY_", frozen=True, extra="forbid")

    # ---- upstreams
    config: Path | None = setting(
        None, group=UPSTREAMS, metavar='FILE',
        description='YAML or TOML config file',
        doc=('The config file itself. Only meaningful on the command line (--config FILE) or in the environment '
             '(PDPROXY_CONFIG); a value written here is ignored.'))
    prefill_servers: Servers = setting(
        (), group=UPSTREAMS, aliases=('--prefill-servers-list',), metavar='LIST',
        example=["http://10.0.0.11:8100", {"url": "http://10.0.0.12:8100", "weight": 2}],
        description=('prefill servers, comma separated: host:port or http(s)://host:port, optional @MODEL and '
                     '=WEIGHT (h:8100@llama=2)'),
        doc=('Prefill (P) API servers. Each entry is `host:port`, `http://host:port` or `https://host:port` (no '
             'path), optionally followed by `@MODEL` (the model name it serves; when not given, read from its '
             '/v1/models by the health probe) and `=WEIGHT` (a whole number 1-1000, default 1), or a mapping '
             '{url, weight, model}. A server listed twice is an error. A weight-2 server takes twice the share of '
             'a weight-1 server under every policy. Servers of several models make one proxy for all of them: '
             'each request goes to the servers of its `model` (README: Several models).'))
    decode_servers: Servers = setting(
        (), group=UPSTREAMS, aliases=('--decode-servers-list',), metavar='LIST',
        example=["10.0.0.21:8200"],
        description='decode servers, same form as --prefill-servers',
        doc='Decode (D) API servers, same forms as prefill_servers.')
    # ---- listening
    host: str = setting(
        "0.0.0.0", group=LISTENING,
        description='address to listen on',
        doc='Address the proxy listens on.')
    port: int = setting(
        8000, group=LISTENING, ge=0, le=65535, aliases=('--listen-port',),
        description='port to listen on',
        doc='TCP port the proxy listens on (0-65535; 0 picks a free port).')
    workers: int = setting(
        1, group=LISTENING, ge=1, le=64,
        description='worker processes sharing the port via SO_REUSEPORT; with more than 1, --metrics-port is required',
        doc=("Worker processes sharing the port through SO_REUSEPORT (1-64), like nginx's worker_processes: more "
             "open streams than one process's file limit allows, and more than one core. With more than 1, "
             'metrics_port is required (merged /metrics of every worker, with a `worker` label) and the admin API '
             'is served only on admin_port. Limits such as max_concurrency apply per worker.'))
    # ---- load balancing
    prefill_policy: str = setting(
        "least_conn", group=POLICIES,
        description='prefill load balancing: least_conn, cache_aware, least_tokens, prefix_hash, round_robin',
        doc=('How a prefill server is chosen: least_conn (fewest in-flight requests per unit of weight, ties '
             'broken at random), round_robin (smooth weighted round robin), prefix_hash (the same prompt prefix '
             'goes to the same server, with bounded load), least_tokens (fewest estimated prompt tokens in flight)'
             " or cache_aware (where the prompt's prefix is probably cached, unless that server's queue costs more"
             ' than recomputing it: the recommendation for the prefill tier). An unknown name stops the proxy at '
             'start-up.'))
    decode_policy: str = setting(
        "least_conn", group=POLICIES,
        description='decode load balancing: least_conn, round_robin, prefix_hash, least_tokens, cache_aware',
        doc='How a decode server is chosen; the same policies as prefill_policy.')
    prefix_hash_chars: int = setting(
        1024, group=POLICIES, ge=1,
        description='prefix_hash: leading prompt characters hashed',
        doc=('prefix_hash only: how many leading characters of the prompt are hashed (for chat, of the whole '
             'rendered conversation, role and content of every message). Unit: characters, at least 1.'))
    prefix_hash_vnodes: int = setting(
        160, group=POLICIES, ge=1, le=10000,
        description='prefix_hash: ring points per unit of weight',
        doc=('prefix_hash only: points each server owns on the hash ring, per unit of weight (1-10000). More '
             'points spread prompts more evenly.'))
    prefix_hash_load_factor: float = setting(
        0.25, group=POLICIES, gt=0,
        description='prefix_hash: a server over (1+F) x its share of in-flight requests passes requests on',
        doc=('prefix_hash only: a server already holding more than (1 + this factor) x its weighted share of the '
             'in-flight requests passes the request on to the next server on the ring. Unit: a fraction (0.25 = 25'
             ' % over its fair share), greater than 0.'))
    cache_block_chars: int = setting(
        128, group=POLICIES, ge=1, le=1_000_000,
        description='cache_aware: characters per block of its prefix index',
        doc=('cache_aware only: its prefix index cuts the prompt (for chat, the whole rendered conversation) into '
             "blocks of this many characters; each block's key covers the whole prefix up to it. Unit: characters,"
             ' at least 1.'))
    cache_index_max_blocks: int = setting(
        32768, group=POLICIES, ge=1,
        description='cache_aware: blocks remembered per server, least recently used dropped first',
        doc=('cache_aware only: blocks remembered per prefill server, least recently used forgotten first. Set it '
             "near what one server's KV cache holds: its capacity in tokens x chars_per_token / cache_block_chars."
             ' Each block costs about 180 bytes of proxy memory (6 MB per server at the default).'))
    cache_aware_weight: float = setting(
        2.0, group=POLICIES, ge=0,
        description='cache_aware: w in cost = w x uncached prompt tokens + load',
        doc=('cache_aware only: w in the cost it minimises, (w x estimated uncached prompt tokens + load) / '
             'weight. With cache_aware_load: tokens, a recomputed token counts w times a token queued ahead; the '
             'default 2 counts it twice, since recomputing delays this request and everything queued behind it on '
             'that server. Larger values hold on to cached prefixes longer, smaller ones spread load sooner; 1 is '
             "the greedy choice for this request's own TTFT. With requests, w converts tokens into requests "
             '(0.005: recomputing 200 tokens costs as much as one more request queued ahead). At least 0.'))
    cache_aware_load: Literal["tokens", "requests"] = setting(
        "tokens", group=POLICIES,
        description='cache_aware: load = in-flight uncached prompt tokens or in-flight requests',
        doc=('cache_aware only: the load in its cost: tokens (estimated uncached prompt tokens in flight on the '
             'server, i.e. its queued prefill work) or requests (in-flight requests).'))
    chars_per_token: float = setting(
        4.0, group=POLICIES, gt=0,
        description='cache_aware, least_tokens: prompt characters per estimated token without --tokenizer',
        doc=('cache_aware and least_tokens: prompt characters per estimated token when no tokenizer is given. '
             'Greater than 0.'))
    tokenizer: Path | None = setting(
        None, group=POLICIES, metavar='PATH', default_text="estimate from characters",
        description=("cache_aware, least_tokens: count tokens with this local tokenizer.json (needs "
                     "pdproxy[tokenizer])"),
        doc=('cache_aware and least_tokens: a local Hugging Face tokenizer.json to count prompt tokens exactly '
             'instead of estimating them from characters. Needs the optional extra: pip install '
             "'pdproxy[tokenizer]'. Nothing is downloaded."))
    shared_routing: bool = setting(
        True, group=POLICIES,
        description='with --workers: every worker routes on the host\'s load, caps and prefix decisions',
        doc=("With workers above 1: the workers share one routing table (in-flight requests and tokens per "
             "upstream, caps counted over all workers, cache_aware's prefix decisions). Off: each worker routes "
             "on its own counts and learns prefixes alone, and each worker's caps apply to it alone (the cost "
             "of sharing can then be measured against it)."))
    kv_events: bool = setting(
        False, group=POLICIES,
        description=("cache_aware: route on each prefill engine's KV-cache events (vLLM --kv-events-config), found "
                     "at its GET /kv_event_sources unless --kv-event-sources names them; needs --tokenizer"),
        doc=("cache_aware: route on each prefill engine's KV-cache events (vLLM's --kv-events-config, ZMQ) where "
             'they are in sequence ("exact"); the approximate index decides for a server whose events are missing '
             "or being replayed. Needs tokenizer (the request's token blocks are matched against the engine's) and "
             "pip install 'pdproxy[kv-events]'."))
    kv_event_sources: str = setting(
        "", group=POLICIES, metavar='URL=PUB[|REPLAY],...', default_text="ask each server",
        description=("cache_aware: where prefill servers publish KV events, e.g. "
                     "http://p1:8100=tcp://p1:5557|tcp://p1:5558"),
        doc=('kv_events: where each prefill server publishes, as URL=PUB[|REPLAY], comma-separated, e.g. '
             '"http://p1:8100=tcp://p1:5557|tcp://p1:5558". Servers not listed are asked (GET /kv_event_sources).'))
    chat_template: Path | None = setting(
        None, group=POLICIES, metavar='PATH', default_text="the one in tokenizer_config.json beside --tokenizer",
        description="kv events: the model's chat template, to render chats as the engine does",
        doc=("kv_events: the model's chat template (a jinja2 file), to render chats as the engine does. Default: "
             "the chat_template of the tokenizer_config.json beside tokenizer."))
    engine_metrics_interval: float = setting(
        0.0, group=POLICIES, ge=0,
        description=("cache_aware, least_tokens: read each engine's running/waiting requests from its /metrics "
                     "every this many seconds and count them in its load (0 is off)"),
        doc=("cache_aware and least_tokens: read each engine's vllm:num_requests_running and "
             'vllm:num_requests_waiting from its /metrics every this many seconds and count them in its load '
             "(never less than pdproxy's own count), so replicas that do not see each other's requests do not all "
             'pick one engine. A reading older than 3 intervals is ignored. Seconds, >= 0; 0 is off.'))
    # ---- KV handoff
    kv_adapter: str = setting(
        "vllm", group=HANDOFF,
        description='KV handoff protocol: vllm, omni, sglang, mooncake, nixl-push (README: Engines and handoffs)',
        doc=("KV-cache handoff protocol between P and D: vllm (vLLM's kv_transfer_params, NixlConnector pull), omni "
             "(omni-infer's LLMDataDist), sglang (SGLang's bootstrap rooms), mooncake (vLLM's MooncakeConnector) or "
             "nixl-push (vLLM's NixlPushConnector). An unknown name stops the proxy at start-up."))
    handoff_meta: dict[str, dict[str, Any]] = setting(
        {}, group=HANDOFF, metavar='JSON', default_text='none',
        example={"http://10.0.0.11:8100": {"bootstrap_port": 9000}},
        description="per-server handoff metadata that wins over discovery, e.g. '{\"http://p1:8100\": "
                    "{\"bootstrap_port\": 9000}}'",
        doc=('Per-server handoff metadata, keyed by server URL, that wins over what the handoff discovers from the '
             'server itself (SGLang bootstrap_port, Mooncake/NIXL-push engine_id): for engines whose metadata is '
             'not on their HTTP API.'))
    pd_min_prompt_tokens: int = setting(
        0, group=HANDOFF, ge=0, metavar='N',
        description=('send prompts whose estimated uncached part on the chosen decode server is under N tokens to '
                     'that server alone, without prefill; 0 means always disaggregate'),
        doc=("Skip disaggregation when it does not pay (llm-d's threshold): a prompt whose estimated uncached part "
             'is under this many tokens goes to the decode server alone, as a normal request; the uncached part is '
             "known with --decode-policy cache_aware, else the whole prompt counts. Not with --kv-adapter sglang "
             "(SGLang's decode servers take only disaggregated requests). 0 (the default) always disaggregates."))
    # ---- failover
    prefill_retries: int = setting(
        2, group=FAILOVER, ge=0, le=16,
        description='other prefill servers tried after a failed prefill',
        doc=('How many other prefill servers are tried after a failed prefill (connect error, timeout, 5xx, an '
             "answer that is not JSON). A 4xx is the client's mistake: relayed, never retried. Unit: retries, 0-16"
             ' (0 = no retry).'))
    flow_retries: int = setting(
        1, group=FAILOVER, ge=0, le=8,
        description='whole PD flows re-run when a decode fails before its first byte',
        doc=('When a decode fails before its first byte reached the client (a connect error, a 5xx or a KV-load '
             'error event; never a timeout after the decode server accepted the request), the whole PD flow runs '
             'again on another decode server (fresh prefill, fresh KV handle: the old blocks may already be '
             'freed). After the first byte, a failure ends the stream with an SSE error event instead. Unit: '
             'retries, 0-8.'))
    prefill_hedge_budget: float = setting(
        0.1, group=FAILOVER, ge=0, le=1,
        description='share of in-flight prefills that may be hedged at once; 0 turns hedging off',
        doc=('A prefill attempt that takes far longer than its prompt should (see prefill_hedge_multiple) is hedged: '
             'the same prefill starts on another prefill server while the first keeps running, the first good '
             'answer wins and the other is cancelled (never held against its server). At most this share of the '
             "prefills in flight are hedged at once (Envoy's retry budget), and never fewer than prefill_hedge_min "
             'may be. Hedges count as attempts: prefill_retries 0 turns hedging off too. Unit: share, 0-1 '
             '(0 = never hedge).'))
    prefill_hedge_min: int = setting(
        3, group=FAILOVER, ge=0, le=1000,
        description='hedges allowed at once whatever the budget, so a proxy at a low rate can still hedge',
        doc=('Hedges that may run at once whatever prefill_hedge_budget says (like Envoy\'s min_retry_concurrency): '
             'at a low request rate the share alone would allow none. Unit: hedges.'))
    prefill_hedge_multiple: float = setting(
        4.0, group=FAILOVER, ge=1,
        description='hedge a prefill attempt after this many times its expected duration',
        doc=("An attempt's expected duration is this server's observed prefill time per prompt token (an EWMA over "
             'its successful prefills, queueing included) times the prompt\'s estimated tokens; it is hedged '
             'after this multiple of it, never before prefill_hedge_floor. Unit: multiple, at least 1.'))
    prefill_hedge_floor: float = setting(
        1.0, group=FAILOVER, gt=0,
        description='seconds a prefill attempt runs at least before it may be hedged',
        doc=('No attempt is hedged sooner than this, however short its prompt (and, before any prefill was '
             'observed, every attempt is hedged after this). Unit: seconds, greater than 0.'))
    # ---- timeouts
    connect_timeout: float = setting(
        5.0, group=TIMEOUTS, gt=0,
        description='seconds to connect to an upstream',
        doc='Time allowed to open a connection to an upstream. Unit: seconds, greater than 0.')
    prefill_timeout: float = setting(
        300.0, group=TIMEOUTS, gt=0,
        description='seconds for one prefill attempt',
        doc=('Time allowed for one prefill attempt (request sent to answer read); long prompts can take minutes. '
             'Unit: seconds, greater than 0.'))
    prefill_deadline: float = setting(
        600.0, group=TIMEOUTS, gt=0,
        description='seconds for all prefill attempts of a request together',
        doc=('Time allowed for all prefill attempts of one request together, failovers included; at least '
             'prefill_timeout. Unit: seconds.'))
    decode_first_byte_timeout: float = setting(
        300.0, group=TIMEOUTS, gt=0,
        description='seconds from a streamed decode request to its first byte',
        doc=("Time from sending a streamed decode request to its first byte (the decode server's queue, the KV "
             'transfer and the first token). Past it the client gets 504 and the decode is not rerun: the decode '
             'server had accepted it. Unit: seconds, greater than 0.'))
    decode_response_timeout: float = setting(
        600.0, group=TIMEOUTS, gt=0,
        description='seconds for the whole answer of a non-streamed decode',
        doc=('Time from sending a non-streamed decode request to the end of its answer: the whole generation. '
             'Past it the client gets 504 and the decode is not rerun (a rerun would generate it all again). '
             'decode_timeout, when set, caps it too. Unit: seconds, greater than 0.'))
    stream_idle_timeout: float = setting(
        300.0, group=TIMEOUTS, gt=0,
        description='max seconds between two chunks of a decode stream',
        doc=('Longest gap between two chunks of a decode stream; past it the decode connection is closed and the '
             "client's stream ends with an SSE error event. Unit: seconds, greater than 0."))
    decode_timeout: float = setting(
        0.0, group=TIMEOUTS, ge=0,
        description='cap on a whole decode in seconds; 0 means none, as long generations are legitimate',
        doc=('Cap on a whole decode, first byte to last. Long generations are legitimate, so there is none by '
             'default. Unit: seconds, 0 = no cap.'))
    # ---- health
    health_path: str = setting(
        "/health", group=HEALTH,
        description='path probed on every upstream',
        doc='Path probed with GET on every upstream; any 2xx is healthy.')
    health_interval: float = setting(
        5.0, group=HEALTH, ge=0,
        description='seconds between health probes of an upstream; 0 turns active checks off',
        doc=("Seconds between two probes of one upstream (with +-10% jitter so probes don't align). 0 turns active"
             ' checks off.'))
    health_timeout: float = setting(
        2.0, group=HEALTH, gt=0,
        description='seconds one health probe may take',
        doc='Time one probe may take. Unit: seconds.')
    health_rise: int = setting(
        2, group=HEALTH, ge=1, le=100,
        description='consecutive good probes that make an unhealthy upstream healthy',
        doc='Consecutive good probes that make an unhealthy upstream healthy again (1-100).')
    health_fall: int = setting(
        3, group=HEALTH, ge=1, le=100,
        description='consecutive failed probes that make a healthy upstream unhealthy',
        doc=('Consecutive failed probes that make a healthy upstream unhealthy (1-100). A new upstream (state '
             'unknown) is routable at once, and unhealthy after its first failed probe.'))
    # ---- passive ejection (outlier detection)
    eject_after: int = setting(
        3, group=EJECTION, ge=0, le=1000,
        description='consecutive failed requests (connect error, timeout, 5xx) that eject an upstream; 0 turns it off',
        doc=('Consecutive failed requests (connect error, timeout, 5xx, broken stream; never a 4xx) that eject an '
             'upstream. 0 turns ejection off.'))
    eject_base_time: float = setting(
        30.0, group=EJECTION, gt=0,
        description='seconds of the first ejection; each repeat adds as much again',
        doc=('Length of the first ejection; the n-th ejection lasts n times as long, up to eject_max_time. An '
             'ejected upstream returns on its first good probe after that (or at once when health checks are off).'
             ' Unit: seconds.'))
    eject_max_time: float = setting(
        300.0, group=EJECTION, gt=0,
        description='longest ejection in seconds',
        doc='Longest ejection. Unit: seconds, at least eject_base_time.')
    eject_max_share: float = setting(
        0.5, group=EJECTION, gt=0, le=1,
        description='largest share of a pool ejected at once, 0-1; one upstream may always be',
        doc=('Largest share of a pool that may be ejected at once (one upstream always may be). Unit: a fraction, '
             'more than 0 and at most 1.'))
    healthy_panic_threshold: float = setting(
        0.5, group=EJECTION, ge=0, le=1,
        description=("below this share of healthy members (0-1) a pool routes to all its members again, as Envoy's "
                     "healthy panic; 0 turns it off"),
        doc=("The last healthy member of a pool is never ejected. Healthy panic (Envoy's): when fewer than this "
             "share of a pool's members in service (not drained, removed or warming) are healthy, the pool routes "
             "to all of them again, unhealthy and ejected included: the health signal itself is then suspect, and "
             "the few healthy members would take the whole load. pdproxy_pool_panic{role} is 1 and one line is "
             "logged on entering and on leaving panic. Unit: a fraction, 0-1; 0 turns it off."))
    # ---- overload protection
    prefill_max_in_flight: int = setting(
        0, group=ADMISSION, ge=0, aliases=('--prefill-max-num-seqs',),
        description='cap on concurrent requests per prefill server; 0 means none',
        doc=("Cap on concurrent requests per prefill server (like omni-infer's max_num_seqs); a full server is "
             'skipped by every policy. 0 = no cap.'))
    decode_max_in_flight: int = setting(
        0, group=ADMISSION, ge=0, aliases=('--decode-max-num-seqs',),
        description='cap on concurrent requests per decode server; 0 means none',
        doc='The same per decode server, counted from the routing decision to the end of the stream. 0 = no cap.')
    max_concurrency: int = setting(
        0, group=ADMISSION, ge=0,
        description='cap on requests served at once by the proxy; 0 means none',
        doc='Cap on requests the proxy serves at once. 0 = no cap.')
    queue_size: int = setting(
        1024, group=ADMISSION, ge=0,
        description='requests that may wait for a slot when everything is full',
        doc=('When every slot is taken, up to this many requests wait, first come first served; one more is '
             'answered 503 with Retry-After at once.'))
    queue_timeout: float = setting(
        30.0, group=ADMISSION, gt=0,
        description='seconds a request may wait for a slot before a 503 with Retry-After',
        doc=('How long a request may wait for a slot before a 503 with Retry-After. A client that disconnects '
             'leaves the queue. Unit: seconds.'))
    # ---- lifecycle
    drain_timeout: float = setting(
        60.0, group=LIFECYCLE, ge=0,
        description='seconds in-flight requests may run on after SIGTERM/SIGINT',
        doc=('On SIGTERM/SIGINT, /health and new requests answer 503 at once while requests in flight run on for '
             'up to this long; then the process exits 0. A second signal stops at once. Unit: seconds.'))
    # ---- requests
    max_body_bytes: int = setting(
        100 * 1024 * 1024, group=REQUESTS, ge=1024, default_text="100 MiB",
        description='largest accepted request body',
        doc=('Largest request body accepted from a client; a larger one is answered 413. Unit: bytes, at least '
             '1024.'))
    max_fanout: int = setting(
        16, group=REQUESTS, ge=1,
        description='most PD flows one request may fan out to (prompts in a batch x n)',
        doc=('A list of prompts, or n > 1, runs one PD flow per prompt and sample, merged into one answer; a '
             'request that needs more flows than this is answered 400. Each flow takes one admission slot.'))
    # ---- client-side limits (nginx's names where they exist)
    client_header_timeout: float = setting(
        60.0, group=CLIENTS, gt=0,
        description='seconds from connect (or a keep-alive request\'s first byte) to the end of the request head',
        doc=("nginx's client_header_timeout: a client that takes longer to send its request line and headers is "
             'closed (408 once some bytes arrived): a slowloris costs a connection for this long at most. Unit: '
             'seconds.'))
    client_body_timeout: float = setting(
        60.0, group=CLIENTS, gt=0,
        description='longest gap in seconds between two reads of a request body',
        doc=("nginx's client_body_timeout: the longest pause between two reads of a request body; then 408 and "
             'close. Unit: seconds.'))
    keepalive_timeout: float = setting(
        75.0, group=CLIENTS, gt=0,
        description='seconds an idle keep-alive client connection stays open',
        doc="nginx's keepalive_timeout: an idle keep-alive client connection is closed after this. Unit: seconds.")
    send_timeout: float = setting(
        60.0, group=CLIENTS, gt=0,
        description='seconds a client may leave a response write undrained before it is closed',
        doc=("nginx's send_timeout: a client that stops reading for this long while the proxy has bytes for it is "
             "closed, and its request ends as the client's fault (499 in the access log; never counted against the "
             'decode server, which was only paused meanwhile). Unit: seconds.'))
    client_half_close: Literal["abort", "answer"] = setting(
        "abort", group=CLIENTS,
        description="a client's FIN while its request is served: abort (it left; the default) or answer",
        doc=("What a client's FIN (shutdown of its sending side) while its request is served means. abort: the "
             "client left, as nginx (proxy_ignore_client_abort off) and Envoy read it; its prefill and decode are "
             "cancelled at once, so no engine works for a client that is gone. answer: a FIN after a complete "
             "request is a half-close (nc -N, some load balancers and health probers); the answer is written, "
             "then the connection closed. A client that really left is then noticed only at the first write that "
             "fails, so a non-streamed request runs its whole generation for nobody."))
    max_connections: int = setting(
        10_000, group=CLIENTS, ge=1,
        description='open client connections per process; more get 503',
        doc=('Open client connections per process (per worker with --workers); a connection over the cap is '
             'answered 503 with Retry-After and closed. A proxied stream holds two file descriptors, so at start '
             'the cap is lowered (one INFO line) to what the open-file limit (ulimit -n) holds with room for upstream '
             'connections: a flood of clients meets the cap, never EMFILE, and no upstream is blamed for it.'))
    max_header_bytes: int = setting(
        64 * 1024, group=CLIENTS, ge=1024,
        description='largest request line + headers; more get 431',
        doc='Largest request line plus headers; a larger head is answered 431 and closed. Unit: bytes.')
    max_headers: int = setting(
        128, group=CLIENTS, ge=8,
        description='most request headers; more get 431',
        doc='Most headers a request may carry; more are answered 431 and closed.')
    body_budget_bytes: int = setting(
        512 * 1024 * 1024, group=CLIENTS, ge=1024, default_text="512 MiB",
        description='request-body bytes held at once per process; over it 503 + Retry-After',
        doc=('Request-body bytes the process holds at once, while bodies are read and parsed (taken from '
             'Content-Length before the body is read): a request that does not fit is answered 503 with '
             'Retry-After instead of growing memory. Unit: bytes.'))
    upstream_keepalive_timeout: float = setting(
        4.0, group=CLIENTS, gt=0,
        description='seconds an idle upstream connection is kept for reuse (below the engines\' 5 s)',
        doc=("Idle connections to P and D are closed after this, below the engines' own keep-alive (vLLM's uvicorn "
             'closes idle connections after 5 s), so the proxy rarely reuses one the engine is closing; when it '
             'does, the call is re-sent once on a fresh connection (outcome stale_retry, never held against the '
             'engine). Unit: seconds.'))
    upstream_api_key: SecretStr | None = setting(
        None, group=REQUESTS, metavar='KEY', default_text="the client's header is forwarded", example="sk-change-me",
        description="send 'Authorization: Bearer KEY' upstream instead of the client's header",
        doc=('When set, every upstream call carries "Authorization: Bearer <this key>" instead of the client\'s own'
             ' Authorization header.'))
    api_key: Annotated[list[SecretStr], NoDecode] = setting(
        [], group=REQUESTS, metavar='KEY', repeatable=True, default_text='none',
        description=("clients must send 'Authorization: Bearer KEY' (repeat the flag, or commas in env, for "
                     "several keys; env PDPROXY_API_KEY or --api-key-file keep them out of ps)"),
        doc=('Client API keys, as vLLM\'s --api-key: every route but /health, /livez and /metrics needs '
             '"Authorization: Bearer <one of these>" (checked in constant time; 401 otherwise). Keys are never '
             'logged, and with keys on the client\'s Authorization header is not forwarded upstream (upstreams '
             'get upstream_api_key, or no Authorization).'))
    api_key_file: Path | None = setting(
        None, group=REQUESTS, metavar='PATH', example="/etc/pdproxy/api-keys",
        description="client API keys, one per line ('KEY' or 'KEY MAX_IN_FLIGHT'; # comments)",
        doc=('A file of client API keys, one per line: "KEY", or "KEY MAX_IN_FLIGHT" to cap that key\'s requests '
             'in flight; blank lines and # comments are skipped. Added to api_key. Read at start-up.'))
    api_key_max_in_flight: int = setting(
        0, group=REQUESTS, ge=0, metavar='N',
        description="requests in flight each client API key may have; over it 429 (0: no cap)",
        doc=('How many requests each client API key may have in flight at once (its own line in api_key_file '
             'wins); one more is answered 429 with Retry-After: 1. 0 means no cap.'))
    route_pools: Annotated[dict[str, Literal["prefill", "decode"]], NoDecode] = setting(
        {}, group=REQUESTS, metavar='ROUTE=POOL,...', default_text='none',
        example={"/v1/embeddings": "prefill", "/tokenize": "prefill"},
        description="send pass-through routes to the prefill or decode pool, e.g. '/v1/embeddings=prefill'",
        doc=('Which pool serves each pass-through route (README: Routes): prefill or decode (the default), as '
             '"ROUTE=POOL" pairs separated by commas, or a mapping in a config file. /v1/responses also decides '
             'where its GET and cancel by id go. An unknown route stops the proxy at start-up.'))
    # ---- logging
    log_level: Literal["debug", "info", "warning", "error", "critical"] = setting(
        "info", group=LOGGING,
        description='log level',
        doc='Log level: debug, info, warning, error or critical (any case).')
    access_log: bool = setting(
        True, group=LOGGING,
        description='one log line per request',
        doc='One access-log line per request (request id, P, D, status, prefill ms, TTFT ms, total ms).')
    access_log_format: Literal["text", "json"] = setting(
        "text", group=LOGGING,
        description='access log lines as text or as one JSON object each',
        doc=('Access log lines as plain text, or as one JSON object per line (time, request_id, endpoint, client, '
             'prefill_upstream, decode_upstream, status, prefill_ms, ttft_ms, total_ms, bytes_out, retries, '
             'error).'))
    # ---- metrics
    metrics_port: int | None = setting(
        None, group=METRICS, ge=1, le=65535, default_text="the main port", example=9100,
        description='serve /metrics on this port (same --host) instead of the main port',
        doc=('Serve /metrics on this port (on the same host address) instead of the main port, e.g. to keep it off'
             ' the public listener.'))
    otel_endpoint: str | None = setting(
        None, group=METRICS, metavar='URL', default_text='none', example="http://otel-collector:4318/v1/traces",
        description="export OpenTelemetry traces by OTLP/HTTP to this URL (needs the otel extra)",
        doc=('OpenTelemetry tracing (pip install "pdproxy[otel]"): one span per request with child spans for the '
             'queue, each prefill attempt, the decode first byte and the stream, exported in batches by OTLP over '
             'HTTP to this URL; each leg carries its span\'s W3C traceparent. Unset (the default): no tracing, '
             'and opentelemetry is not imported.'))
    otel_service_name: str = setting(
        "pdproxy", group=METRICS,
        description="service.name of the exported spans",
        doc='The service.name resource attribute of the spans (otel_endpoint).')
    # ---- admin API and runtime membership
    admin_token: SecretStr | None = setting(
        None, group=ADMIN, metavar='TOKEN',
        description=("bearer token for /admin/upstreams; without one the admin API answers loopback clients "
                     "only (env PDPROXY_ADMIN_TOKEN is the safer place)"),
        doc=('Bearer token for /admin/upstreams (compared in constant time). Without one, the admin API answers '
             'only loopback clients that did not come through another proxy.'))
    admin_port: int | None = setting(
        None, group=ADMIN, ge=0, le=65535, default_text="the main port", example=8001,
        description='serve the admin API on this port of --admin-host instead of the main port',
        doc='Serve the admin API on this port of admin_host instead of the main port.')
    admin_host: str = setting(
        "127.0.0.1", group=ADMIN,
        description='address of the admin listener',
        doc='Address of the admin listener when admin_port is set.')
    state_file: Path | None = setting(
        None, group=ADMIN, metavar='PATH', example="/var/lib/pdproxy/upstreams.json",
        description='keep membership changes in this file and restore them at start-up',
        doc=('Keep membership changes made through the admin API in this JSON file (written atomically) and '
             'restore them at start-up; when the file exists it wins over the server lists above. A corrupt file '
             'stops the start-up with a clear message.'))
    max_upstreams: int = setting(
        1024, group=ADMIN, ge=1, le=100_000,
        description='most upstreams per role, configured or added at runtime',
        doc=('Most upstreams per role, from the server lists, the state file, discovery or the admin API (an admin '
             'call that would go over answers 409 and changes nothing). It bounds every scan of a pool on the '
             'request path and the size of /metrics.'))

    # ---- discovery
    discovery: Literal["none", "file", "dns", "kubernetes"] = setting(
        "none", group=DISCOVERY,
        description="where upstreams are discovered at runtime: none, file, dns or kubernetes",
        doc=("A discovery source keeps the pools in step with a file, DNS names or Kubernetes EndpointSlices: "
             "new upstreams are added with warm-up, vanished ones drain and are removed after "
             "discovery_removal_delay. Upstreams from the server lists or the admin API are never touched "
             "by it. With a source, a role it covers may start with no servers listed. See README, Discovery."))
    discovery_file: Path | None = setting(
        None, group=DISCOVERY, metavar="PATH", example="/etc/pdproxy/upstreams.yaml",
        description="discovery=file: the YAML or JSON file of upstreams to watch",
        doc=("discovery=file: a YAML or JSON file `{prefill: [...], decode: [...]}` whose entries have the form "
             "of prefill_servers (plus an optional `ready: false` to drain one). It is re-read when it changes; "
             "replace it atomically (write a temporary file, then rename). A file that does not parse keeps "
             "the last good list, is logged and counted in pdproxy_discovery_errors_total."))
    discovery_interval: float = setting(
        5.0, group=DISCOVERY, gt=0,
        description="seconds between two looks at the discovery file or two DNS resolutions",
        doc="How often the file source checks its file and the dns source resolves its names. Unit: seconds.")
    discovery_removal_delay: float = setting(
        30.0, group=DISCOVERY, ge=0,
        description="seconds an upstream must stay gone from discovery before it drains and is removed",
        doc=("Damping: an upstream that vanishes from its source keeps its place (and its traffic) this long, "
             "so a record that flaps does not churn the pools; then it drains and leaves once idle. One "
             "marked not ready (Kubernetes) drains at once instead. Unit: seconds, 0 = at once."))
    discovery_scheme: Literal["http", "https"] = setting(
        "http", group=DISCOVERY,
        description="scheme of discovered upstreams (dns, kubernetes)",
        doc="URL scheme of the upstreams the dns and kubernetes sources find (they only learn addresses).")
    discovery_dns_prefill: str = setting(
        "", group=DISCOVERY, metavar="NAMES",
        description="discovery=dns: prefill names, comma separated: host:port (A/AAAA) or _svc._tcp.name (SRV)",
        doc=("discovery=dns: names that resolve to the prefill servers, comma separated. `name:port` is "
             "resolved to its A and AAAA records (a Kubernetes headless Service lists only ready pods); a name "
             "starting with `_` (e.g. `_http._tcp.prefill.service.consul`) to its SRV records of the lowest "
             "priority, with their ports and weights."))
    discovery_dns_decode: str = setting(
        "", group=DISCOVERY, metavar="NAMES",
        description="discovery=dns: decode names, the same forms as --discovery-dns-prefill",
        doc="discovery=dns: names that resolve to the decode servers, the same forms as discovery_dns_prefill.")
    discovery_dns_nameserver: str | None = setting(
        None, group=DISCOVERY, metavar="HOST[:PORT]", default_text="the system resolver (/etc/resolv.conf)",
        example="10.96.0.10:53",
        description="discovery=dns: ask this DNS server (IP, IP:PORT or [IPv6]:PORT)",
        doc="discovery=dns: the DNS server to ask instead of the system's (e.g. Consul's agent on port 8600).")
    discovery_dns_timeout: float = setting(
        2.0, group=DISCOVERY, gt=0,
        description="discovery=dns: seconds one resolution may take",
        doc="discovery=dns: time one resolution of all names may take; a timeout keeps the last list. Unit: seconds.")
    discovery_k8s_prefill_selector: str = setting(
        "", group=DISCOVERY, metavar="SELECTOR",
        description="discovery=kubernetes: label selector of the prefill EndpointSlices",
        doc=("discovery=kubernetes: label selector of the EndpointSlices of the prefill servers, e.g. "
             "`kubernetes.io/service-name=vllm-prefill`."))
    discovery_k8s_decode_selector: str = setting(
        "", group=DISCOVERY, metavar="SELECTOR",
        description="discovery=kubernetes: label selector of the decode EndpointSlices",
        doc="discovery=kubernetes: label selector of the EndpointSlices of the decode servers.")
    discovery_k8s_port: str = setting(
        "", group=DISCOVERY, metavar="NAME|NUMBER", default_text="the slice's only port",
        description="discovery=kubernetes: the EndpointSlice port to use, by name or number",
        doc="discovery=kubernetes: which of the EndpointSlice's ports is the API port, by name or number.")
    discovery_k8s_namespace: str | None = setting(
        None, group=DISCOVERY, metavar="NAMESPACE", default_text="the pod's own namespace",
        description="discovery=kubernetes: namespace of the EndpointSlices",
        doc="discovery=kubernetes: the namespace watched (default: the service account's, else `default`).")
    discovery_k8s_api_url: str | None = setting(
        None, group=DISCOVERY, metavar="URL", default_text="in-cluster (KUBERNETES_SERVICE_HOST)",
        description="discovery=kubernetes: the API server's URL",
        doc=("discovery=kubernetes: the API server. Default: the in-cluster address from "
             "KUBERNETES_SERVICE_HOST/PORT, with the pod's service account token and CA."))
    discovery_k8s_token_file: Path = setting(
        "/var/run/secrets/kubernetes.io/serviceaccount/token", group=DISCOVERY, metavar="PATH", validate_default=True,
        description="discovery=kubernetes: bearer token file (re-read on every reconnect; skipped if absent)",
        doc="discovery=kubernetes: the service account token, re-read on every reconnect since tokens rotate.")
    discovery_k8s_ca_file: Path = setting(
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", group=DISCOVERY, metavar="PATH", validate_default=True,
        description="discovery=kubernetes: CA bundle of the API server (https only; system CAs if absent)",
        doc="discovery=kubernetes: the CA that signed the API server's certificate.")

    @field_validator("prefill_servers", "decode_servers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_servers(value)

    @field_validator("handoff_meta", mode="before")
    @classmethod
    def _parse_handoff_meta(cls, value: Any) -> Any:
        if isinstance(value, str):  # the CLI and env give JSON text
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError as exc:
                raise ValueError(f"not a JSON object: {exc}") from None
        if isinstance(value, dict):
            return {normalize_url(str(url)): meta for url, meta in value.items()}
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):  # env: commas between keys
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def client_keys(self) -> list[tuple[str, int]]:
        """(key, cap) of every client API key, -1 for the default cap; read_key_file's ValueError for a bad file."""
        from pdproxy.http.auth import read_key_file

        keys = [(key.get_secret_value(), -1) for key in self.api_key]
        if self.api_key_file is not None:
            try:
                keys += read_key_file(self.api_key_file)
            except OSError as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc.strerror}") from None
        return keys

    @field_validator("route_pools", mode="before")
    @classmethod
    def _parse_route_pools(cls, value: Any) -> Any:
        if isinstance(value, str):  # the CLI and env give ROUTE=POOL pairs
            pairs = [item.strip().partition("=") for item in value.split(",") if item.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError("want ROUTE=POOL pairs separated by commas, e.g. /v1/embeddings=prefill")
            value = {route.strip(): pool.strip() for route, _, pool in pairs}
        if isinstance(value, dict):
            unknown = sorted(set(value) - PASSTHROUGH_PATHS)
            if unknown:
                raise ValueError(f"unknown route(s) {', '.join(unknown)}; pass-through routes: "
                                 f"{', '.join(sorted(PASSTHROUGH_PATHS))}")
        return value

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_servers(self) -> Settings:
        restoring = self.state_file is not None and self.state_file.exists()
        self._check_discovery()
        for role, servers in (("prefill", self.prefill_servers), ("decode", self.decode_servers)):
            if not servers and not restoring and role not in self.discovered_roles():
                raise ValueError(
                    f"no {role} servers: set --{role}-servers, PDPROXY_{role.upper()}_SERVERS "
                    f"or {role}_servers in the config file (or restore them with --state-file, "
                    f"or discover them: --discovery)"
                )
            urls = [s.url for s in servers]
            duplicates = sorted({u for u in urls if urls.count(u) > 1})
            if duplicates:
                raise ValueError(f"{role} server listed twice: {', '.join(duplicates)}")
        if self.prefill_deadline < self.prefill_timeout:
            raise ValueError("prefill_deadline (all prefill attempts) must be >= prefill_timeout (one attempt)")
        if self.eject_max_time < self.eject_base_time:
            raise ValueError("eject_max_time must be >= eject_base_time")
        for role, servers in (("prefill", self.prefill_servers), ("decode", self.decode_servers)):
            if len(servers) > self.max_upstreams:
                raise ValueError(f"{len(servers)} {role} servers, more than max_upstreams ({self.max_upstreams})")
        if self.kv_events and not self.tokenizer:
            raise ValueError("kv_events needs tokenizer (--tokenizer): the request's token blocks are matched "
                             "against the engine's")
        if self.workers > 1 and self.metrics_port is None:
            raise ValueError("workers > 1 needs metrics_port (--metrics-port): the supervisor serves the "
                             "workers' merged /metrics there")
        return self

    def discovered_roles(self) -> frozenset[str]:
        """The roles the configured discovery source provides (they may start with no servers)."""
        if self.discovery == "file":
            return frozenset({"prefill", "decode"})
        if self.discovery == "dns":
            names = {"prefill": self.discovery_dns_prefill, "decode": self.discovery_dns_decode}
        elif self.discovery == "kubernetes":
            names = {"prefill": self.discovery_k8s_prefill_selector, "decode": self.discovery_k8s_decode_selector}
        else:
            return frozenset()
        return frozenset(role for role, value in names.items() if value.strip())

    def _check_discovery(self) -> None:
        if self.discovery == "file" and self.discovery_file is None:
            raise ValueError("discovery=file needs discovery_file (--discovery-file)")
        if self.discovery == "dns" and not self.discovered_roles():
            raise ValueError("discovery=dns needs discovery_dns_prefill and/or discovery_dns_decode")
        if self.discovery == "kubernetes" and not self.discovered_roles():
            raise ValueError("discovery=kubernetes needs discovery_k8s_prefill_selector and/or "
                             "discovery_k8s_decode_selector")

    def server_limits(self) -> ServerLimits:
        """The client-side limits every listener of the lean HTTP server runs with."""
        return ServerLimits(header_timeout=self.client_header_timeout, body_timeout=self.client_body_timeout,
                            keepalive_timeout=self.keepalive_timeout, max_connections=self.max_connections,
                            max_header_bytes=self.max_header_bytes, max_headers=self.max_headers,
                            max_body_bytes=self.max_body_bytes, body_budget_bytes=self.body_budget_bytes,
                            send_timeout=self.send_timeout,
                            answer_half_closed=self.client_half_close == "answer")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = getattr(init_settings, "init_kwargs", {}).get("config") or os.environ.get("PDPROXY_CONFIG")
        return init_settings, env_settings, ConfigFileSource(settings_cls, path)


class ConfigFileSource(PydanticBaseSettingsSource):
    """The values of a YAML or TOML config file (keys are setting names; `-` and `_` both work)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | Path | None) -> None:
        super().__init__(settings_cls)
        self._values = read_config_file(Path(path)) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def read_config_file(path: Path) -> dict[str, Any]:
    """Load a config file into a dict of settings; ConfigError says what is wrong with it."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ConfigError(f"cannot read config file {path}: it is a directory")
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of setting names to values")
    return _flatten_sections(path, {str(key).replace("-", "_"): value for key, value in data.items()})


def _flatten_sections(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """`timeouts: {connect_timeout: 5}` is `connect_timeout: 5`; a key in the wrong section or set twice is an error."""
    groups = {name: (field.json_schema_extra or {}).get("group") for name, field in Settings.model_fields.items()}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # A mapping under a section's name is that section, even where a setting has the section's name
        # (`discovery: {discovery: dns, ...}`): no setting named after a section takes a mapping.
        if key in GROUP_TITLES and isinstance(value, dict):
            entries = {str(inner).replace("-", "_"): item for inner, item in value.items()}
            for inner in entries:
                if groups.get(inner) != key:
                    raise ConfigError(f"config file {path}: {key}.{inner} is not a setting of the {key} section")
        else:
            entries = {key: value}
        for name, item in entries.items():
            if name in flat:
                raise ConfigError(f"config file {path}: {name} is set twice")
            flat[name] = item
    return flat


def load_settings(cli_values: dict[str, Any]) -> Settings:
    """Build Settings from the flags the user gave; ConfigError carries a one-line reason."""
    try:
        return Settings(**cli_values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """Pydantic's multi-line report as one operator-readable line."""
    return "invalid settings: " + describe_validation_error(exc)


def describe_validation_error(exc: ValidationError) -> str:
    """Every problem pydantic found, as `field: problem; …` on one line."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if not isinstance(part, int)) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
