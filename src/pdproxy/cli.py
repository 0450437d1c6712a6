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
from pdproxy.settings_docs import add_serve_arguments, serve_options

COMMANDS = ("serve", "demo", "mock", "upstreams")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# (flags, settings field, argparse options, help), generated from the Settings model (settings_docs.py).
# Only flags the user gave reach Settings, so env and the config file fill in the rest.
SERVE_OPTIONS = serve_options()


class _Parser(argparse.ArgumentParser):
    """Argument errors as one `pdproxy: …` line and exit code 2, like every other start-up error."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)")


def _admin_flags(*, suppress: bool) -> argparse.ArgumentParser:
    """--admin-url and --token, for `upstreams` itself (with defaults) and for each verb (SUPPRESS)."""
    flags = argparse.ArgumentParser(add_help=False)
    url_default = os.environ.get("PDPROXY_ADMIN_URL", "http://127.0.0.1:8000")
    flags.add_argument("--admin-url", default=argparse.SUPPRESS if suppress else url_default,
                       help="the proxy's admin address (env PDPROXY_ADMIN_URL; default http://127.0.0.1:8000)")
    flags.add_argument("--token", default=argparse.SUPPRESS if suppress else os.environ.get("PDPROXY_ADMIN_TOKEN"),
                       help="admin token (env PDPROXY_ADMIN_TOKEN)")
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pdproxy",
        description="Global proxy for prefill/decode disaggregated LLM serving. "
        "`pdproxy --prefill-servers … --decode-servers …` runs the proxy (the `serve` command).",
    )
    parser.add_argument("--version", action="version", version=f"pdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,demo,mock,upstreams}", parser_class=_Parser)
    add_serve_arguments(commands.add_parser("serve", help="run the proxy (default command)"))

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
    mock.add_argument("--protocol", choices=("vllm", "omni", "sglang", "mooncake", "nixl-push"), default="vllm",
                      help="PD protocol the engine speaks (match the proxy's --kv-adapter; default vllm)")
    mock.add_argument("--bootstrap-port", type=int, default=0,
                      help="sglang/mooncake/nixl-push prefill: port of its bootstrap server (nixl-push: its "
                           "side channel; default: any free port)")
    mock.add_argument("--kv-timeout-ms", type=float, default=2000.0,
                      help="sglang/mooncake: how long P and D wait for each other's KV (default 2000)")
    mock.add_argument("--dp-size", type=int, default=1, help="mooncake prefill: DP ranks on /query (default 1)")
    mock.add_argument("--engine-id", default="", help="the engine's KV engine id (default: a fresh uuid)")
    mock.add_argument("--log-level", default="info", choices=LOG_LEVELS)

    # The admin flags work before and after the verb (`pdproxy upstreams list --admin-url URL`): the verb's
    # copies default to SUPPRESS, so they only override what the user actually gave after it.
    upstreams = commands.add_parser("upstreams", help="list, add, remove or drain upstreams of a running proxy",
                                    parents=[_admin_flags(suppress=False)])
    actions = upstreams.add_subparsers(dest="action", required=True, parser_class=_Parser)
    verb_flags = _admin_flags(suppress=True)
    actions.add_parser("list", help="a table of every upstream", parents=[verb_flags])
    add = actions.add_parser("add", help="add an upstream (traffic once its first health probe passes)",
                             parents=[verb_flags])
    add.add_argument("role", choices=("prefill", "decode"))
    add.add_argument("url", help="host:port or http(s)://host:port")
    add.add_argument("--weight", type=int, default=1)
    add.add_argument("--skip-warmup", action="store_true", help="route to it at once, before any probe")
    add.add_argument("--model", help="the model it serves (default: read from its /v1/models)")
    for name, help_text in (("remove", "drain an upstream, then remove it"),
                            ("drain", "stop sending it new requests, keep it listed"),
                            ("undrain", "send it requests again")):
        action = actions.add_parser(name, help=help_text, parents=[verb_flags])
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
                               cache_blocks=args.cache_blocks, protocol=args.protocol,
                               bootstrap_port=args.bootstrap_port, kv_timeout_ms=args.kv_timeout_ms,
                               dp_size=args.dp_size, engine_id=args.engine_id)
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
