"""Command line: argv → Settings, one-line errors with exit code 2, aliases, help and version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import pdproxy
from pdproxy import app as app_module
from pdproxy import cli
from pdproxy.cli import SERVE_OPTIONS, build_parser, main
from pdproxy.handoff import HANDOFFS as ADAPTERS
from pdproxy.policies import POLICIES
from pdproxy.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SERVERS = ["--prefill-servers", "p1:8100,p2:8100=2", "--decode-servers", "d1:8200"]


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the server loop: `main` builds the app for real, then records the settings it would serve."""
    captured: list[Settings] = []

    async def fake_serve(app: Any, settings: Settings) -> None:
        return None

    def fake_run(coroutine: Coroutine[Any, Any, None]) -> None:
        coroutine.close()

    def recording_serve(app: Any, settings: Settings) -> Coroutine[Any, Any, None]:
        captured.append(settings)
        return fake_serve(app, settings)

    monkeypatch.setattr(app_module, "serve", recording_serve)
    monkeypatch.setattr(app_module, "run", fake_run)
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    return captured


def fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run main, expect exit 2 and exactly one `pdproxy:` line on stderr; return that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pdproxy: ")
    return lines[0]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("argv", "expected"), [
    (["--prefill-servers", "x:0", "--decode-servers", "y:1"], "port must be 1-65535"),
    (["--prefill-servers", "ftp://x:1", "--decode-servers", "y:1"], "scheme"),
    (["--prefill-servers", "x:1/v1", "--decode-servers", "y:1"], "scheme://host:port"),
    (["--prefill-servers", "x:1=0", "--decode-servers", "y:1"], "weight"),
    (["--prefill-servers", "x:1,x:1", "--decode-servers", "y:1"], "listed twice"),
    (["--prefill-servers", "x:1"], "no decode servers"),
    (["--decode-servers", "y:1"], "no prefill servers"),
    ([], "no prefill servers"),
    ([*SERVERS, "--port", "70000"], "port"),
    ([*SERVERS, "--connect-timeout", "0"], "connect_timeout"),
    ([*SERVERS, "--prefill-retries", "99"], "prefill_retries"),
    ([*SERVERS, "--config", "missing.yaml"], "cannot read config file missing.yaml"),
    ([*SERVERS, "--log-level", "debug", "--config", "."], "cannot read config file ."),
    ([*SERVERS, "--workers", "2"], "workers > 1 needs metrics_port (--metrics-port)"),
    ([*SERVERS, "--workers", "0", "--metrics-port", "9100"], "workers"),
    ([*SERVERS, "--workers", "65", "--metrics-port", "9100"], "workers"),
])
def test_invalid_settings_exit_2_with_one_line(argv: list[str], expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert expected in fail(argv, capsys)


def test_the_serve_command_may_be_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert "port must be 1-65535" in fail(["serve", "--prefill-servers", "x:0", "--decode-servers", "y:1"], capsys)


@pytest.mark.parametrize("flag", ["--prefill-policy", "--decode-policy"])
def test_unknown_policy_lists_valid_names(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = fail([*SERVERS, flag, "fastest"], capsys)
    assert "fastest" in line
    for name in POLICIES:
        assert name in line


def test_unknown_kv_adapter_lists_valid_names(capsys: pytest.CaptureFixture[str]) -> None:
    line = fail([*SERVERS, "--kv-adapter", "carrier-pigeon"], capsys)
    assert "carrier-pigeon" in line
    for name in ADAPTERS:
        assert name in line


def test_bad_env_value_fails_the_same_way(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PDPROXY_PORT", "not-a-port")
    assert "port" in fail(SERVERS, capsys)


def test_bad_config_file_fails_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pd.yaml").write_text("prefill_servers: [a:1\n", encoding="utf-8")
    assert "pd.yaml is not valid" in fail(["--config", "pd.yaml"], capsys)


# ---------------------------------------------------------------- flags reach Settings


def test_flags_reach_settings(served: list[Settings]) -> None:
    main([*SERVERS, "--host", "127.0.0.1", "--port", "9000", "--prefill-policy", "prefix_hash",
          "--decode-policy", "round_robin", "--prefix-hash-chars", "256", "--prefix-hash-load-factor", "0.5",
          "--prefill-retries", "0", "--connect-timeout", "1.5", "--prefill-timeout", "30",
          "--stream-idle-timeout", "45", "--max-body-bytes", "2048", "--upstream-api-key", "sk-x",
          "--kv-adapter", "vllm", "--log-level", "debug", "--no-access-log"])
    (settings,) = served
    assert [(s.url, s.weight) for s in settings.prefill_servers] == [("http://p1:8100", 1), ("http://p2:8100", 2)]
    assert [s.url for s in settings.decode_servers] == ["http://d1:8200"]
    assert (settings.host, settings.port) == ("127.0.0.1", 9000)
    assert (settings.prefill_policy, settings.decode_policy) == ("prefix_hash", "round_robin")
    assert (settings.prefix_hash_chars, settings.prefix_hash_load_factor) == (256, 0.5)
    assert settings.prefill_retries == 0
    assert (settings.connect_timeout, settings.prefill_timeout, settings.stream_idle_timeout) == (1.5, 30, 45)
    assert settings.max_body_bytes == 2048
    assert settings.upstream_api_key is not None and settings.upstream_api_key.get_secret_value() == "sk-x"
    assert settings.log_level == "debug"
    assert settings.access_log is False


def test_workers_hand_serve_to_the_supervisor(served: list[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    from pdproxy import workers

    supervised: list[Settings] = []

    def recording_supervise(settings: Settings, setup_logging: Any) -> Coroutine[Any, Any, None]:
        supervised.append(settings)
        return fake()

    async def fake() -> None:
        return None

    monkeypatch.setattr(workers, "supervise", recording_supervise)
    main([*SERVERS, "--workers", "2", "--metrics-port", "9100"])
    main([*SERVERS, "--workers", "1"])
    assert [s.workers for s in supervised] == [2]
    assert [s.workers for s in served] == [1]  # one worker: today's single process


def test_aliases_reach_the_same_settings(served: list[Settings]) -> None:
    main(["--prefill-servers-list", "a:1", "--decode-servers-list", "b:2", "--listen-port", "9001"])
    main(["serve", "--prefill-servers", "a:1", "--decode-servers", "b:2", "--port", "9001"])
    aliased, plain = served
    assert aliased == plain
    assert aliased.port == 9001
    assert aliased.prefill_servers[0].url == "http://a:1"
    assert aliased.decode_servers[0].url == "http://b:2"


@pytest.mark.parametrize(("alias", "flag", "value", "dest"), [
    ("--prefill-servers-list", "--prefill-servers", "a:1,b:2", "prefill_servers"),
    ("--decode-servers-list", "--decode-servers", "c:3", "decode_servers"),
    ("--listen-port", "--port", "8123", "port"),
])
def test_alias_parses_to_the_same_dest(alias: str, flag: str, value: str, dest: str) -> None:
    by_alias = build_parser().parse_args(["serve", alias, value])
    by_flag = build_parser().parse_args(["serve", flag, value])
    assert vars(by_alias) == vars(by_flag)
    assert str(getattr(by_alias, dest)) == value


def test_only_given_flags_are_set() -> None:
    """Flags left out must not reach Settings, or their argparse defaults would beat env and file."""
    args = build_parser().parse_args(["serve", "--port", "1"])
    assert vars(args) == {"command": "serve", "port": 1}


def test_env_and_file_fill_what_flags_leave_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                served: list[Settings]) -> None:
    (tmp_path / "pd.toml").write_text('decode_servers = "file-d:1"\nport = 1111\nhost = "file-host"\n',
                                      encoding="utf-8")
    monkeypatch.setenv("PDPROXY_CONFIG", "pd.toml")
    monkeypatch.setenv("PDPROXY_PORT", "2222")
    main(["--prefill-servers", "cli-p:1"])
    (settings,) = served
    assert settings.prefill_servers[0].url == "http://cli-p:1"
    assert settings.decode_servers[0].url == "http://file-d:1"
    assert settings.port == 2222
    assert settings.host == "file-host"
    assert settings.log_level == "info"


def test_example_config_is_accepted_by_the_cli(served: list[Settings]) -> None:
    main(["--config", str(REPO / "config" / "pdproxy.example.yaml")])
    main(["--config", str(REPO / "config" / "pdproxy.example.toml"), "--port", "8001"])
    yaml_settings, toml_settings = served
    assert yaml_settings.port == 8000 and toml_settings.port == 8001


def test_every_flag_maps_to_a_settings_field() -> None:
    for _flags, dest, _options, _help in SERVE_OPTIONS:
        assert dest in Settings.model_fields, dest


def test_every_settings_field_has_a_flag() -> None:
    dests = {dest for _flags, dest, _options, _help in SERVE_OPTIONS}
    assert set(Settings.model_fields) - dests == set()


def _help_default(help_text: str) -> str | None:
    match = re.search(r"\(default ([^)]+)\)", help_text) or re.search(r"(\w+) \(default\)", help_text)
    return match.group(1) if match else None


@pytest.mark.parametrize("option", SERVE_OPTIONS, ids=lambda o: o[0][0])
def test_help_defaults_match_settings(option: tuple[tuple[str, ...], str, dict[str, Any], str]) -> None:
    _flags, dest, _options, help_text = option
    stated = _help_default(help_text)
    if stated is None:
        return
    default = Settings.model_fields[dest].default
    if isinstance(default, bool):
        assert stated == ("on" if default else "off")
    elif isinstance(default, int | float):
        number = stated.split()
        value = float(number[0]) * (1024 * 1024 if number[1:] == ["MiB"] else 1)
        assert value == default
    elif not default:  # None, or an empty mapping: the help says "none"
        assert stated == "none"
    else:
        assert stated == default


# ---------------------------------------------------------------- help and version


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pdproxy")
    for command in ("serve", "demo", "mock"):
        assert command in out


def test_serve_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flags, _dest, _options, _help in SERVE_OPTIONS:
        for flag in flags:
            assert flag in out


def test_help_after_serve_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--prefill-servers", "a:1", "-h"])
    assert info.value.code == 0
    assert "--listen-port" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pdproxy {pdproxy.__version__}"


# ---------------------------------------------------------------- as a process


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PDPROXY_")}
    env["PYTHONPATH"] = str(REPO / "src")
    return subprocess.run([sys.executable, "-m", "pdproxy", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=30, check=False)


def test_module_version() -> None:
    result = run_module("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pdproxy {pdproxy.__version__}"


def test_module_invalid_settings() -> None:
    result = run_module("--prefill-servers", "x:0", "--decode-servers", "y:1")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pdproxy: ")
    assert "x:0" in lines[0]
