"""Command line: `pdproxy [serve] …` (the default; `--workers N` hands it to the supervisor in workers.py),
`pdproxy demo`, `pdproxy mock`."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pdproxy import __version__

COMMANDS = ("serve", "demo", "mock", "upstreams")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# (flags, settings field, argparse options, help). Flags map one to one onto Settings fields;
# only flags the user gave reach Settings, so env and the config file fill in the rest.
SERVE_OPTIONS: tuple[tuple[tuple[str, ...], str, dict[str, Any], str], ...] = (
    (("--prefill-servers", "--prefill-servers-list"), "prefill_servers", {"metavar": "LIST"},
     "prefill servers, comma separated: host:port or http(s)://host:port, optional =WEIGHT (h:8100=2)"),
    (("--decode-servers", "--decode-servers-list"), "decode_servers", {"metavar": "LIST"},
     "decode servers, same form as --prefill-servers"),
    (("--host",), "host", {}, "address to listen on (default 0.0.0.0)"),
    (("--port", "--listen-port"), "port", {"type": int}, "port to listen on (default 8000)"),
    (("--workers",), "workers", {"type": int},
     "worker processes sharing the port via SO_REUSEPORT (default 1); with more than 1, --metrics-port is "
     "required"),
    (("--prefill-policy",), "prefill_policy", {},
     "prefill load balancing: least_conn (default), cache_aware, least_tokens, prefix_hash, round_robin"),
    (("--decode-policy",), "decode_policy", {},
     "decode load balancing: least_conn (default), round_robin, prefix_hash, least_tokens, cache_aware"),
    (("--prefix-hash-chars",), "prefix_hash_chars", {"type": int},
     "prefix_hash: leading prompt characters hashed (default 1024)"),
    (("--prefix-hash-vnodes",), "prefix_hash_vnodes", {"type": int},
     "prefix_hash: ring points per unit of weight (default 160)"),
    (("--prefix-hash-load-factor",), "prefix_hash_load_factor", {"type": float},
     "prefix_hash: a server over (1+F) x its share of in-flight requests passes requests on (default 0.25)"),
    (("--cache-block-chars",), "cache_block_chars", {"type": int},
     "cache_aware: characters per block of its prefix index (default 128)"),
    (("--cache-index-max-blocks",), "cache_index_max_blocks", {"type": int},
     "cache_aware: blocks remembered per server, least recently used dropped first (default 32768)"),
    (("--cache-aware-weight",), "cache_aware_weight", {"type": float},
     "cache_aware: w in cost = w x uncached prompt tokens + load (default 2.0)"),
    (("--cache-aware-load",), "cache_aware_load", {"choices": ("tokens", "requests")},
     "cache_aware: load = in-flight uncached prompt tokens or in-flight requests (default tokens)"),
    (("--chars-per-token",), "chars_per_token", {"type": float},
     "cache_aware, least_tokens: prompt characters per estimated token without --tokenizer (default 4.0)"),
    (("--tokenizer",), "tokenizer", {"metavar": "PATH"},
     "cache_aware, least_tokens: count tokens with this local tokenizer.json (needs pdproxy[tokenizer]; "
     "default: estimate from characters)"),
    (("--kv-events",), "kv_events", {"action": "store_true"},
     "cache_aware: route on each prefill engine's KV-cache events (vLLM --kv-events-config), found at its "
     "GET /kv_event_sources unless --kv-event-sources names them; needs --tokenizer"),
    (("--kv-event-sources",), "kv_event_sources", {"metavar": "URL=PUB[|REPLAY],..."},
     "cache_aware: where prefill servers publish KV events, e.g. http://p1:8100=tcp://p1:5557|tcp://p1:5558"),
    (("--engine-metrics-interval",), "engine_metrics_interval", {"type": float},
     "cache_aware, least_tokens: read each engine's running/waiting requests from its /metrics every this "
     "many seconds and count them in its load (0 is off; default 0)"),
    (("--chat-template",), "chat_template", {"metavar": "PATH"},
     "kv events: the model's chat template (default: chat_template in the tokenizer_config.json beside "
     "--tokenizer)"),
    (("--prefill-retries",), "prefill_retries", {"type": int},
     "other prefill servers tried after a failed prefill (default 2)"),
    (("--flow-retries",), "flow_retries", {"type": int},
     "whole PD flows re-run when a decode fails before its first byte (default 1)"),
    (("--connect-timeout",), "connect_timeout", {"type": float}, "seconds to connect to an upstream (default 5)"),
    (("--prefill-timeout",), "prefill_timeout", {"type": float},
     "seconds for one prefill attempt (default 300)"),
    (("--prefill-deadline",), "prefill_deadline", {"type": float},
     "seconds for all prefill attempts of a request together (default 600)"),
    (("--decode-first-byte-timeout",), "decode_first_byte_timeout", {"type": float},
     "seconds from the decode request to its first byte; for a non-streamed request, the whole answer "
     "(default 300)"),
    (("--stream-idle-timeout",), "stream_idle_timeout", {"type": float},
     "max seconds between two chunks of a decode stream (default 300)"),
    (("--decode-timeout",), "decode_timeout", {"type": float},
     "cap on a whole decode in seconds; 0 means none, as long generations are legitimate (default 0)"),
    (("--health-path",), "health_path", {}, "path probed on every upstream (default /health)"),
    (("--health-interval",), "health_interval", {"type": float},
     "seconds between health probes of an upstream; 0 turns active checks off (default 5)"),
    (("--health-timeout",), "health_timeout", {"type": float}, "seconds one health probe may take (default 2)"),
    (("--health-rise",), "health_rise", {"type": int},
     "consecutive good probes that make an unhealthy upstream healthy (default 2)"),
    (("--health-fall",), "health_fall", {"type": int},
     "consecutive failed probes that make a healthy upstream unhealthy (default 3)"),
    (("--eject-after",), "eject_after", {"type": int},
     "consecutive failed requests (connect error, timeout, 5xx) that eject an upstream; 0 turns it off "
     "(default 3)"),
    (("--eject-base-time",), "eject_base_time", {"type": float},
     "seconds of the first ejection; each repeat adds as much again (default 30)"),
    (("--eject-max-time",), "eject_max_time", {"type": float}, "longest ejection in seconds (default 300)"),
    (("--eject-max-share",), "eject_max_share", {"type": float},
     "largest share of a pool ejected at once, 0-1; one upstream may always be (default 0.5)"),
    (("--prefill-max-in-flight", "--prefill-max-num-seqs"), "prefill_max_in_flight", {"type": int},
     "cap on concurrent requests per prefill server; 0 means none (default 0)"),
    (("--decode-max-in-flight", "--decode-max-num-seqs"), "decode_max_in_flight", {"type": int},
     "cap on concurrent requests per decode server; 0 means none (default 0)"),
    (("--max-concurrency",), "max_concurrency", {"type": int},
     "cap on requests served at once by the proxy; 0 means none (default 0)"),
    (("--queue-size",), "queue_size", {"type": int},
     "requests that may wait for a slot when everything is full (default 1024)"),
    (("--queue-timeout",), "queue_timeout", {"type": float},
     "seconds a request may wait for a slot before a 503 with Retry-After (default 30)"),
    (("--drain-timeout",), "drain_timeout", {"type": float},
     "seconds in-flight requests may run on after SIGTERM/SIGINT (default 60)"),
    (("--max-body-bytes",), "max_body_bytes", {"type": int}, "largest accepted request body (default 100 MiB)"),
    (("--upstream-api-key",), "upstream_api_key", {"metavar": "KEY"},
     "send 'Authorization: Bearer KEY' upstream instead of the client's header"),
    (("--kv-adapter",), "kv_adapter", {}, "KV handoff protocol: vllm (default)"),
    (("--log-level",), "log_level", {"choices": LOG_LEVELS}, "log level (default info)"),
    (("--access-log",), "access_log", {"action": argparse.BooleanOptionalAction},
     "one log line per request (default on)"),
    (("--access-log-format",), "access_log_format", {"choices": ("text", "json")},
     "access log lines as text or as one JSON object each (default text)"),
    (("--metrics-port",), "metrics_port", {"type": int},
     "serve /metrics on this port (same --host) instead of the main port (default: the main port)"),
    (("--admin-token",), "admin_token", {"metavar": "TOKEN"},
     "bearer token for /admin/upstreams; without one the admin API answers loopback clients only "
     "(env PDPROXY_ADMIN_TOKEN is the safer place)"),
    (("--admin-port",), "admin_port", {"type": int},
     "serve the admin API on this port of --admin-host instead of the main port (default: the main port)"),
    (("--admin-host",), "admin_host", {}, "address of the admin listener (default 127.0.0.1)"),
    (("--state-file",), "state_file", {"metavar": "PATH"},
     "keep membership changes in this file and restore them at start-up (default: none)"),
    (("--config",), "config", {"metavar": "FILE"}, "YAML or TOML config file (env: PDPROXY_CONFIG)"),
)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one `pdproxy: …` line and exit code 2, like every other start-up error."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)")


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    for flags, dest, options, help_text in SERVE_OPTIONS:
        parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=help_text, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pdproxy",
        description="Global proxy for prefill/decode disaggregated LLM serving. "
        "`pdproxy --prefill-servers … --decode-servers …` runs the proxy (the `serve` command).",
    )
    parser.add_argument("--version", action="version", version=f"pdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,demo,mock,upstreams}", parser_class=_Parser)
    _serve_parser(commands.add_parser("serve", help="run the proxy (default command)"))

    demo = commands.add_parser("demo", help="run the proxy in front of 2 mock prefill + 1 mock decode engines")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="proxy port (default 8000)")
    demo.add_argument("--prefill-policy", default="least_conn", help="prefill policy (default least_conn)")
    demo.add_argument("--log-level", default="info", choices=LOG_LEVELS)

    mock = commands.add_parser("mock", help="run a mock vLLM engine (for demos, tests, benchmarks)")
    mock.add_argument("--role", choices=("prefill", "decode", "both"), default="both")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, required=True)
    mock.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token / prefill answer")
    mock.add_argument("--itl-ms", type=float, default=0.0, help="delay between streamed tokens")
    mock.add_argument("--tokens", type=int, default=16, help="tokens generated when the request sets no max_tokens")
    mock.add_argument("--model", default="mock")
    mock.add_argument("--prefill-ms-per-token", type=float, default=0.0,
                      help="prompt compute per uncached token, one prompt at a time (default 0: none)")
    mock.add_argument("--cache-blocks", type=int, default=4096,
                      help="prefix cache size in 16-token blocks; 0: no cache (default 4096)")
    mock.add_argument("--log-level", default="info", choices=LOG_LEVELS)

    upstreams = commands.add_parser("upstreams", help="list, add, remove or drain upstreams of a running proxy")
    upstreams.add_argument("--admin-url", default=os.environ.get("PDPROXY_ADMIN_URL", "http://127.0.0.1:8000"),
                           help="the proxy's admin address (env PDPROXY_ADMIN_URL; default http://127.0.0.1:8000)")
    upstreams.add_argument("--token", default=os.environ.get("PDPROXY_ADMIN_TOKEN"),
                           help="admin token (env PDPROXY_ADMIN_TOKEN)")
    actions = upstreams.add_subparsers(dest="action", required=True, parser_class=_Parser)
    actions.add_parser("list", help="a table of every upstream")
    add = actions.add_parser("add", help="add an upstream (traffic once its first health probe passes)")
    add.add_argument("role", choices=("prefill", "decode"))
    add.add_argument("url", help="host:port or http(s)://host:port")
    add.add_argument("--weight", type=int, default=1)
    add.add_argument("--skip-warmup", action="store_true", help="route to it at once, before any probe")
    for name, help_text in (("remove", "drain an upstream, then remove it"),
                            ("drain", "stop sending it new requests, keep it listed"),
                            ("undrain", "send it requests again")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("target", help="an upstream id (from list), or ROLE URL", nargs="+")
        if name == "remove":
            action.add_argument("--force", action="store_true", help="remove now, cutting its open streams")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"pdproxy: {message}", file=sys.stderr)
    sys.exit(2)


def _setup_logging(level: str, access_log_format: str = "text") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if access_log_format == "json":  # each line one JSON object, with no prefix
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("pdproxy.access")
        access.addHandler(handler)
        access.propagate = False


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)

    from pdproxy.app import run

    if args.command == "serve":
        from pdproxy.app import build_app, serve
        from pdproxy.membership import StateFileError
        from pdproxy.settings import ConfigError, load_settings

        values = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            settings = load_settings(values)
            app = build_app(settings)  # a wrong policy or adapter name fails here, before binding
        except (ConfigError, StateFileError, ValueError) as exc:
            _fail(str(exc))
        _setup_logging(settings.log_level, settings.access_log_format)
        if settings.workers == 1:
            _run_or_fail(run, serve(app, settings))
            return
        from pdproxy.workers import WorkerStartError, supervise

        del app  # it only validated the settings: each worker builds its own
        try:
            # The workers set up their logging as this process did (the partial crosses the process boundary).
            _run_or_fail(run, supervise(settings, functools.partial(
                _setup_logging, settings.log_level, settings.access_log_format)))
        except WorkerStartError as exc:
            _fail(str(exc))
    elif args.command == "upstreams":
        from pdproxy.admin_client import AdminClientError, run_command

        try:
            print(run_command(args))
        except AdminClientError as exc:
            _fail(str(exc))
    elif args.command == "demo":
        from pdproxy.demo import run_demo

        _setup_logging(args.log_level)
        _run_or_fail(run, run_demo(args.host, args.port, args.prefill_policy))
    else:
        from pdproxy.mock import MockConfig

        _setup_logging(args.log_level)
        try:
            config = MockConfig(role=args.role, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens,
                                model=args.model, prefill_ms_per_token=args.prefill_ms_per_token,
                                cache_blocks=args.cache_blocks)
        except ValueError as exc:
            _fail(str(exc))
        _run_or_fail(run, _serve_mock(config, args.host, args.port))


async def _serve_mock(config: Any, host: str, port: int) -> None:
    """Run a mock engine until SIGINT/SIGTERM."""
    import asyncio

    from pdproxy.app import wait_for_signal
    from pdproxy.mock import serve_mock

    engine = asyncio.ensure_future(serve_mock(config, host, port))
    stop = asyncio.ensure_future(wait_for_signal())
    await asyncio.wait((engine, stop), return_when=asyncio.FIRST_COMPLETED)
    for task in (engine, stop):
        task.cancel()
    await asyncio.gather(engine, stop, return_exceptions=True)
    if engine.done() and not engine.cancelled() and engine.exception():
        raise engine.exception()  # type: ignore[misc]


def _run_or_fail(run: Any, coroutine: Any) -> None:
    try:
        run(coroutine)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # e.g. the port is taken
        _fail(str(exc))
