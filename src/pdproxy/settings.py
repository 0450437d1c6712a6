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

from pdproxy.upstreams import MAX_WEIGHT, normalize_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



class ConfigError(Exception):
    """A setting or the config file is wrong; the message is one line for the operator."""


class UpstreamSpec(BaseModel):
    """One configured server: `host:port`, `http(s)://host:port`, optionally `=weight` (e.g. `h:8100=2`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)

    @field_validator("url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_url(value)

    @classmethod
    def parse(cls, text: str) -> UpstreamSpec:
        address, sep, weight = text.strip().rpartition("=")
        if not sep:
            return cls(url=text)
        if not (weight.isascii() and weight.isdigit()):
            raise ValueError(f"upstream {text!r}: weight after '=' must be a whole number")
        return cls(url=address, weight=int(weight))


def _split_servers(value: Any) -> Any:
    """Accept a comma list (CLI, env) or a list of strings / {url, weight} mappings (config file)."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return tuple(UpstreamSpec.parse(item) if isinstance(item, str) else item for item in value)
    return value


Servers = Annotated[tuple[UpstreamSpec, ...], NoDecode]


class Settings(BaseSettings):
    """Every knob of the proxy. See config/pdproxy.example.yaml for each one explained."""

    model_config = SettingsConfigDict(env_prefix="PDPROXY_", frozen=True, extra="forbid")

    config: Path | None = None
    prefill_servers: Servers = ()
    decode_servers: Servers = ()
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    prefill_policy: str = "least_conn"
    decode_policy: str = "least_conn"
    prefix_hash_chars: int = Field(1024, ge=1)
    prefix_hash_vnodes: int = Field(160, ge=1, le=10000)
    prefix_hash_load_factor: float = Field(0.25, gt=0)
    cache_block_chars: int = Field(128, ge=1, le=1_000_000)
    cache_index_max_blocks: int = Field(32768, ge=1)
    cache_aware_weight: float = Field(2.0, ge=0)
    cache_aware_load: Literal["tokens", "requests"] = "tokens"
    chars_per_token: float = Field(4.0, gt=0)
    tokenizer: Path | None = None
    # Exact routing from the engines' KV-cache events (pdproxy.routing; needs pyzmq and msgspec)
    kv_events: bool = False
    kv_event_sources: str = ""
    chat_template: Path | None = None
    engine_metrics_interval: float = Field(0.0, ge=0)
    kv_adapter: str = "vllm"
    # Failover
    prefill_retries: int = Field(2, ge=0, le=16)
    flow_retries: int = Field(1, ge=0, le=8)
    # Timeouts (seconds)
    connect_timeout: float = Field(5.0, gt=0)
    prefill_timeout: float = Field(300.0, gt=0)
    prefill_deadline: float = Field(600.0, gt=0)
    decode_first_byte_timeout: float = Field(300.0, gt=0)
    stream_idle_timeout: float = Field(300.0, gt=0)
    decode_timeout: float = Field(0.0, ge=0)
    # Active health checks
    health_path: str = "/health"
    health_interval: float = Field(5.0, ge=0)
    health_timeout: float = Field(2.0, gt=0)
    health_rise: int = Field(2, ge=1, le=100)
    health_fall: int = Field(3, ge=1, le=100)
    # Passive ejection
    eject_after: int = Field(3, ge=0, le=1000)
    eject_base_time: float = Field(30.0, gt=0)
    eject_max_time: float = Field(300.0, gt=0)
    eject_max_share: float = Field(0.5, gt=0, le=1)
    # Overload protection
    prefill_max_in_flight: int = Field(0, ge=0)
    decode_max_in_flight: int = Field(0, ge=0)
    max_concurrency: int = Field(0, ge=0)
    queue_size: int = Field(1024, ge=0)
    queue_timeout: float = Field(30.0, gt=0)
    # Lifecycle and limits
    drain_timeout: float = Field(60.0, ge=0)
    max_body_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    upstream_api_key: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    access_log: bool = True
    access_log_format: Literal["text", "json"] = "text"
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Admin API and runtime membership
    admin_token: SecretStr | None = None
    admin_port: int | None = Field(None, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    state_file: Path | None = None

    @field_validator("prefill_servers", "decode_servers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_servers(value)

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
        for role, servers in (("prefill", self.prefill_servers), ("decode", self.decode_servers)):
            if not servers and not restoring:
                raise ValueError(
                    f"no {role} servers: set --{role}-servers, PDPROXY_{role.upper()}_SERVERS "
                    f"or {role}_servers in the config file (or restore them with --state-file)"
                )
            urls = [s.url for s in servers]
            duplicates = sorted({u for u in urls if urls.count(u) > 1})
            if duplicates:
                raise ValueError(f"{role} server listed twice: {', '.join(duplicates)}")
        if self.prefill_deadline < self.prefill_timeout:
            raise ValueError("prefill_deadline (all prefill attempts) must be >= prefill_timeout (one attempt)")
        if self.eject_max_time < self.eject_base_time:
            raise ValueError("eject_max_time must be >= eject_base_time")
        if self.kv_events and not self.tokenizer:
            raise ValueError("kv_events needs tokenizer (--tokenizer): the request's token blocks are matched "
                             "against the engine's")
        if self.workers > 1 and self.metrics_port is None:
            raise ValueError("workers > 1 needs metrics_port (--metrics-port): the supervisor serves the "
                             "workers' merged /metrics there")
        return self

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
    return {str(key).replace("-", "_"): value for key, value in data.items()}


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
