"""Settings: precedence, server lists, config files (YAML, TOML) and one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pdproxy.http.limits import ServerLimits
from pdproxy.settings import ConfigError, Settings, UpstreamSpec, load_settings, read_config_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_YAML = REPO / "config" / "pdproxy.example.yaml"
EXAMPLE_TOML = REPO / "config" / "pdproxy.example.toml"

SERVERS = {"prefill_servers": "p1:8100", "decode_servers": "d1:8200"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(values: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(values)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- defaults and basics


def test_defaults() -> None:
    settings = load_settings(dict(SERVERS))
    assert settings.config is None
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.prefill_policy == settings.decode_policy == "least_conn"
    assert settings.prefix_hash_chars == 1024
    assert settings.prefix_hash_vnodes == 160
    assert settings.prefix_hash_load_factor == 0.25
    assert settings.kv_adapter == "vllm"
    assert settings.prefill_retries == 2
    assert settings.flow_retries == 1
    assert settings.connect_timeout == 5.0
    assert settings.prefill_timeout == 300.0
    assert settings.prefill_deadline == 600.0
    assert settings.decode_first_byte_timeout == 300.0
    assert settings.stream_idle_timeout == 300.0
    assert settings.decode_timeout == 0.0
    assert (settings.health_path, settings.health_interval, settings.health_timeout) == ("/health", 5.0, 2.0)
    assert (settings.health_rise, settings.health_fall) == (2, 3)
    assert (settings.eject_after, settings.eject_base_time, settings.eject_max_time) == (3, 30.0, 300.0)
    assert settings.eject_max_share == 0.5
    assert (settings.prefill_max_in_flight, settings.decode_max_in_flight, settings.max_concurrency) == (0, 0, 0)
    assert (settings.queue_size, settings.queue_timeout, settings.drain_timeout) == (1024, 30.0, 60.0)
    assert settings.max_body_bytes == 100 * 1024 * 1024
    assert settings.upstream_api_key is None
    assert settings.log_level == "info"
    assert settings.access_log is True


def test_settings_are_frozen() -> None:
    settings = load_settings(dict(SERVERS))
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]


def test_api_key_is_secret() -> None:
    settings = load_settings({**SERVERS, "upstream_api_key": "sk-top-secret"})
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "sk-top-secret"
    assert "sk-top-secret" not in repr(settings)
    assert "sk-top-secret" not in str(settings)


def test_log_level_is_case_insensitive() -> None:
    assert load_settings({**SERVERS, "log_level": "WARNING"}).log_level == "warning"


# ---------------------------------------------------------------- server lists


@pytest.mark.parametrize(("text", "url", "weight"), [
    ("h:8100", "http://h:8100", 1),
    ("http://h:8100", "http://h:8100", 1),
    ("http://h:8100/", "http://h:8100", 1),
    ("https://h.example.com:443", "https://h.example.com:443", 1),
    ("h:8100=3", "http://h:8100", 3),
    ("https://h:8443=1000", "https://h:8443", 1000),
    ("  10.0.0.1:8100=2  ", "http://10.0.0.1:8100", 2),
    ("HTTP://Host:8100", "http://host:8100", 1),
    ("[::1]:8100", "http://[::1]:8100", 1),
])
def test_server_forms(text: str, url: str, weight: int) -> None:
    settings = load_settings({"prefill_servers": text, "decode_servers": "d:1"})
    assert settings.prefill_servers == (UpstreamSpec(url=url, weight=weight),)


def test_comma_list() -> None:
    settings = load_settings({"prefill_servers": "a:1, https://b:2=3 ,http://c:3/,", "decode_servers": "d:4"})
    assert [(s.url, s.weight) for s in settings.prefill_servers] == [
        ("http://a:1", 1), ("https://b:2", 3), ("http://c:3", 1)]
    assert [s.url for s in settings.decode_servers] == ["http://d:4"]


def test_list_of_strings_and_mappings() -> None:
    settings = load_settings({"prefill_servers": ["a:1=2", {"url": "b:2", "weight": 5}, {"url": "https://c:3"}],
                              "decode_servers": ("d:4",)})
    assert [(s.url, s.weight) for s in settings.prefill_servers] == [
        ("http://a:1", 2), ("http://b:2", 5), ("https://c:3", 1)]


@pytest.mark.parametrize(("servers", "expected"), [
    ("h:0", "port"),
    ("h:65536", "port"),
    ("h:http", "port"),
    ("h", "missing port"),
    ("ftp://h:21", "scheme"),
    ("unix:///tmp/sock", "scheme"),
    ("h:8100/v1", "scheme://host:port"),
    ("http://h:8100/v1/completions", "scheme://host:port"),
    ("http://h:8100?x=1", "scheme://host:port"),
    ("http://user:pw@h:8100", "scheme://host:port"),
    ("h:8100=0", "greater than or equal to 1"),
    ("h:8100=1001", "less than or equal to 1000"),
    ("h:8100=x", "weight"),
    ("h:8100=-1", "weight"),
    ("h:8100=1.5", "weight"),
    ("h:8100=", "weight"),
    ("a:1,http://a:1/", "listed twice"),
    ("a:1,b:2=2,a:1=3", "listed twice"),
])
def test_bad_prefill_servers(servers: str, expected: str) -> None:
    message = config_error({"prefill_servers": servers, "decode_servers": "d:1"})
    assert "prefill" in message
    assert expected in message


@pytest.mark.parametrize(("entry", "expected"), [
    ({"url": "h:1", "weight": 0}, "weight"),
    ({"url": "h:1", "weight": "heavy"}, "weight"),
    ({"url": "h:1", "colour": "red"}, "colour"),
    ({"weight": 2}, "url"),
])
def test_bad_server_mappings(entry: dict[str, Any], expected: str) -> None:
    message = config_error({"prefill_servers": "p:1", "decode_servers": [entry]})
    assert "decode_servers" in message
    assert expected in message


def test_duplicate_decode_server() -> None:
    message = config_error({"prefill_servers": "p:1", "decode_servers": ["d:1", {"url": "http://d:1", "weight": 2}]})
    assert "decode server listed twice: http://d:1" in message


def test_same_server_in_both_roles_is_allowed() -> None:
    settings = load_settings({"prefill_servers": "h:1", "decode_servers": "h:1"})
    assert settings.prefill_servers[0].url == settings.decode_servers[0].url


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("empty", [None, "", " , ", []])
def test_missing_servers(role: str, empty: Any) -> None:
    values: dict[str, Any] = dict(SERVERS)
    if empty is None:
        del values[f"{role}_servers"]
    else:
        values[f"{role}_servers"] = empty
    message = config_error(values)
    assert f"no {role} servers" in message
    assert f"--{role}-servers" in message and f"PDPROXY_{role.upper()}_SERVERS" in message


@pytest.mark.parametrize(("values", "setting"), [
    ({"port": 70000}, "port"),
    ({"port": -1}, "port"),
    ({"port": "http"}, "port"),
    ({"log_level": "verbose"}, "log_level"),
    ({"prefix_hash_chars": 0}, "prefix_hash_chars"),
    ({"prefix_hash_vnodes": 0}, "prefix_hash_vnodes"),
    ({"prefix_hash_load_factor": 0}, "prefix_hash_load_factor"),
    ({"prefill_retries": -1}, "prefill_retries"),
    ({"prefill_retries": 17}, "prefill_retries"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"prefill_timeout": -5}, "prefill_timeout"),
    ({"stream_idle_timeout": "soon"}, "stream_idle_timeout"),
    ({"max_body_bytes": 100}, "max_body_bytes"),
    ({"access_log": "perhaps"}, "access_log"),
    ({"no_such_setting": 1}, "no_such_setting: unknown setting"),
])
def test_bad_values_name_the_setting(values: dict[str, Any], setting: str) -> None:
    message = config_error({**SERVERS, **values})
    assert message.startswith("invalid settings: ")
    assert setting in message


def test_several_problems_in_one_line() -> None:
    message = config_error({**SERVERS, "port": 70000, "log_level": "loud"})
    assert "port" in message and "log_level" in message


# ---------------------------------------------------------------- environment


def test_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDPROXY_PREFILL_SERVERS", "a:1,https://b:2=4")
    monkeypatch.setenv("PDPROXY_DECODE_SERVERS", "d:3")
    monkeypatch.setenv("PDPROXY_PORT", "9100")
    monkeypatch.setenv("PDPROXY_ACCESS_LOG", "false")
    monkeypatch.setenv("PDPROXY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PDPROXY_PREFIX_HASH_LOAD_FACTOR", "0.5")
    monkeypatch.setenv("PDPROXY_UPSTREAM_API_KEY", "sk-env")
    settings = load_settings({})
    assert [(s.url, s.weight) for s in settings.prefill_servers] == [("http://a:1", 1), ("https://b:2", 4)]
    assert [s.url for s in settings.decode_servers] == ["http://d:3"]
    assert settings.port == 9100
    assert settings.access_log is False
    assert settings.log_level == "debug"
    assert settings.prefix_hash_load_factor == 0.5
    assert settings.upstream_api_key is not None and settings.upstream_api_key.get_secret_value() == "sk-env"


@pytest.mark.parametrize(("name", "value", "setting"), [
    ("PDPROXY_PORT", "eighty", "port"),
    ("PDPROXY_PREFILL_SERVERS", "a:1=0", "prefill_servers"),
    ("PDPROXY_DECODE_SERVERS", "gopher://d:70", "decode_servers"),
    ("PDPROXY_LOG_LEVEL", "chatty", "log_level"),
])
def test_bad_env_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                         setting: str) -> None:
    monkeypatch.setenv(name, value)
    values = {k: v for k, v in SERVERS.items() if k != setting}
    assert setting in config_error(values)


# ---------------------------------------------------------------- config files

YAML_FILE = """\
prefill-servers:
  - a:1
  - url: https://b:2
    weight: 3
decode_servers: d:4
host: file-host
port: 1111
log-level: warning
prefill_policy: prefix_hash
"""

TOML_FILE = """\
prefill-servers = ["a:1", { url = "https://b:2", weight = 3 }]
decode_servers = "d:4"
host = "file-host"
port = 1111
log-level = "warning"
prefill_policy = "prefix_hash"
"""

FILES = {"yaml": ("pd.yaml", YAML_FILE), "yml": ("pd.yml", YAML_FILE), "toml": ("pd.toml", TOML_FILE)}


@pytest.fixture(params=sorted(FILES))
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    name, text = FILES[request.param]
    return write(tmp_path, name, text)


def check_file_values(settings: Settings) -> None:
    assert [(s.url, s.weight) for s in settings.prefill_servers] == [("http://a:1", 1), ("https://b:2", 3)]
    assert [s.url for s in settings.decode_servers] == ["http://d:4"]
    assert settings.prefill_policy == "prefix_hash"


def test_file_via_config_kwarg(config_file: Path) -> None:
    settings = load_settings({"config": str(config_file)})
    check_file_values(settings)
    assert (settings.host, settings.port, settings.log_level) == ("file-host", 1111, "warning")
    assert settings.config == config_file
    assert settings.decode_policy == "least_conn"  # not in the file: the default


def test_file_via_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDPROXY_CONFIG", str(config_file))
    settings = load_settings({})
    check_file_values(settings)
    assert (settings.host, settings.port, settings.log_level) == ("file-host", 1111, "warning")


def test_relative_config_path(config_file: Path) -> None:
    check_file_values(load_settings({"config": config_file.name}))  # the cwd is tmp_path


@pytest.mark.parametrize("via_env", [False, True], ids=["--config", "PDPROXY_CONFIG"])
def test_precedence_cli_over_env_over_file_over_defaults(config_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                         via_env: bool) -> None:
    monkeypatch.setenv("PDPROXY_PORT", "2222")
    monkeypatch.setenv("PDPROXY_HOST", "env-host")
    monkeypatch.setenv("PDPROXY_DECODE_SERVERS", "env-d:5")
    cli: dict[str, Any] = {"port": 3333}
    if via_env:
        monkeypatch.setenv("PDPROXY_CONFIG", str(config_file))
    else:
        cli["config"] = str(config_file)
    settings = load_settings(cli)
    assert settings.port == 3333  # CLI beats env and file
    assert settings.host == "env-host"  # env beats file
    assert [s.url for s in settings.decode_servers] == ["http://env-d:5"]  # env list replaces the file's
    assert settings.log_level == "warning"  # file beats default
    assert len(settings.prefill_servers) == 2  # file only
    assert settings.connect_timeout == 5.0  # default


def test_cli_config_beats_env_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path, "env.yaml", "prefill_servers: e:1\ndecode_servers: e:2\nport: 1\n")
    cli_file = write(tmp_path, "cli.toml", 'prefill_servers = "c:1"\ndecode_servers = "c:2"\nport = 2\n')
    monkeypatch.setenv("PDPROXY_CONFIG", str(env_file))
    settings = load_settings({"config": str(cli_file)})
    assert settings.port == 2
    assert settings.prefill_servers[0].url == "http://c:1"


def test_cli_servers_replace_file_servers(config_file: Path) -> None:
    settings = load_settings({"config": str(config_file), "prefill_servers": "cli:9"})
    assert [s.url for s in settings.prefill_servers] == ["http://cli:9"]
    assert [s.url for s in settings.decode_servers] == ["http://d:4"]


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.yaml", "# nothing here\n")
    assert read_config_file(path) == {}
    settings = load_settings({"config": str(path), **SERVERS})
    assert settings.port == 8000


def test_file_dash_keys_are_normalised(tmp_path: Path) -> None:
    path = write(tmp_path, "dash.yaml", "prefix-hash-chars: 64\nstream-idle-timeout: 5\n")
    assert read_config_file(path) == {"prefix_hash_chars": 64, "stream_idle_timeout": 5}


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("typo.yaml", "prefill_servers: a:1\ndecode_servers: d:1\nprefill_polcy: round_robin\n",
     "prefill_polcy: unknown setting"),
    ("typo.toml", 'prefill_servers = "a:1"\ndecode_servers = "d:1"\nlisten_port = 9\n', "listen_port: unknown setting"),
    ("bad.yaml", "prefill_servers: [a:1\nport: 1\n", "bad.yaml is not valid"),
    ("tabs.yaml", "port:\n\t- 1\n", "tabs.yaml is not valid"),
    ("bad.toml", "port = \n", "bad.toml is not valid"),
    ("list.yaml", "- a:1\n- b:2\n", "expected a mapping"),
    ("scalar.yaml", "just words\n", "expected a mapping"),
    ("pd.json", '{"port": 1}', "use a .yaml, .yml or .toml file"),
    ("pd.ini", "[pdproxy]\nport = 1\n", "use a .yaml, .yml or .toml file"),
    ("port.yaml", "prefill_servers: a:1\ndecode_servers: d:1\nport: 99999\n", "port"),
    ("weight.toml", 'prefill_servers = [{ url = "a:1", weight = 0 }]\ndecode_servers = "d:1"\n', "weight"),
])
def test_bad_config_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    message = config_error({"config": str(path)})
    assert expected in message


def test_unreadable_config_files(tmp_path: Path) -> None:
    missing = config_error({"config": str(tmp_path / "missing.yaml")})
    assert "cannot read config file" in missing and "missing.yaml" in missing
    directory = config_error({"config": str(tmp_path)})
    assert "cannot read config file" in directory and str(tmp_path) in directory


def test_unreadable_config_file_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDPROXY_CONFIG", str(tmp_path / "gone.toml"))
    assert "gone.toml" in config_error(dict(SERVERS))


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("host: caf\xe9\n".encode("latin-1"))
    message = config_error({"config": str(path), **SERVERS})
    assert "latin1.yaml" in message


# ---------------------------------------------------------------- the shipped examples


def test_yaml_example_loads() -> None:
    settings = load_settings({"config": str(EXAMPLE_YAML)})
    assert [(s.url, s.weight) for s in settings.prefill_servers] == [
        ("http://10.0.0.11:8100", 1), ("http://10.0.0.12:8100", 2)]
    assert [s.url for s in settings.decode_servers] == ["http://10.0.0.21:8200"]


def test_toml_example_loads() -> None:
    settings = load_settings({"config": str(EXAMPLE_TOML)})
    yaml_settings = load_settings({"config": str(EXAMPLE_YAML)})
    assert settings.model_dump(exclude={"config"}) == yaml_settings.model_dump(exclude={"config"})


def test_yaml_example_documents_every_setting() -> None:
    data = yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8"))
    assert set(data) == set(Settings.model_fields)
    text = EXAMPLE_YAML.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"PDPROXY_{name.upper()}" in text, f"{name}: the example does not name its env var"


def test_yaml_example_shows_the_defaults() -> None:
    data = yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8"))
    for name, field in Settings.model_fields.items():
        if name in ("prefill_servers", "decode_servers"):
            continue  # realistic examples instead of the empty default
        assert data[name] == field.default, name


def test_yaml_example_every_key_has_a_comment() -> None:
    lines = EXAMPLE_YAML.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith((" ", "#", "-")):
            assert lines[index - 1].startswith("#"), f"no comment above {line!r}"
            comment = []
            for above in reversed(lines[:index]):
                if not above.startswith("#"):
                    break
                comment.append(above)
            assert "default" in " ".join(comment).lower(), f"no default stated above {line!r}"


def test_server_limits_come_from_the_settings() -> None:
    settings = load_settings({"prefill_servers": "p:1", "decode_servers": "d:1", "client_header_timeout": 3,
                              "client_body_timeout": 4, "keepalive_timeout": 5, "send_timeout": 6,
                              "max_connections": 7, "max_header_bytes": 8192, "max_headers": 9,
                              "max_body_bytes": 10_000, "body_budget_bytes": 20_000})
    assert settings.server_limits() == ServerLimits(header_timeout=3, body_timeout=4, keepalive_timeout=5,
                                                    send_timeout=6, max_connections=7, max_header_bytes=8192,
                                                    max_headers=9, max_body_bytes=10_000, body_budget_bytes=20_000)
    assert load_settings({"prefill_servers": "p:1", "decode_servers": "d:1"}).server_limits() == ServerLimits()
