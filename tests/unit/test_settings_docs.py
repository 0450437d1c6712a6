"""One definition per setting: the CLI, README table and example files come from the Settings model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdproxy import settings_docs
from pdproxy.cli import build_parser
from pdproxy.settings import GROUP_TITLES, TIMEOUTS, ConfigError, Settings, read_config_file, setting
from pdproxy.settings_docs import readme_table, render_toml, render_yaml, serve_options, setting_docs, stale_files

REPO = Path(__file__).resolve().parents[2]
FIX = "run: python scripts/gen_settings_docs.py"


def test_generated_files_are_up_to_date() -> None:
    stale = [str(path.relative_to(REPO)) for path in stale_files(REPO)]
    assert stale == [], f"{', '.join(stale)} out of date with src/pdproxy/settings.py; {FIX}"


def test_every_setting_is_fully_defined() -> None:
    for doc in setting_docs():
        assert doc.description, f"{doc.name}: give it a description= ({FIX} afterwards)"
        assert doc.group in GROUP_TITLES, f"{doc.name}: group={doc.group!r} is not one of {sorted(GROUP_TITLES)}"
        assert "(default" not in doc.description, f"{doc.name}: the default is added by the generator"


def test_check_script_passes_on_the_repo() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_settings_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stale_files_are_named_and_rewritten(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    for name in ("pdproxy.example.yaml", "pdproxy.example.toml"):
        shutil.copy(REPO / "config" / name, tmp_path / "config" / name)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("| `--connect-timeout` |", "| `--gone` |"),
                      encoding="utf-8")
    (tmp_path / "config" / "pdproxy.example.toml").write_text("port = 1\n", encoding="utf-8")
    assert sorted(p.name for p in stale_files(tmp_path)) == ["README.md", "pdproxy.example.toml"]
    assert sorted(p.name for p in settings_docs.write_files(tmp_path)) == ["README.md", "pdproxy.example.toml"]
    assert stale_files(tmp_path) == []
    assert "| `--connect-timeout` |" in readme.read_text(encoding="utf-8")


def test_readme_without_markers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="settings-table:start"):
        settings_docs.render_readme("# no table here\n")


class WithNewSetting(Settings):
    """What another helper does to add a knob: one setting() with a description."""

    warmup_probes: int = setting(3, group=TIMEOUTS, ge=1, aliases=("--warm-up-probes",),
                                 description="good probes before a new upstream takes traffic",
                                 doc="How many probes a new upstream must pass first.")


def test_one_field_is_enough_for_every_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_docs, "Settings", WithNewSetting)
    (flags, _dest, options, help_text), = [o for o in serve_options() if o[1] == "warmup_probes"]
    assert flags == ("--warmup-probes", "--warm-up-probes")
    assert options == {"type": int}
    assert help_text == "good probes before a new upstream takes traffic (default 3)"
    assert ("| `--warmup-probes` (`--warm-up-probes`) | `PDPROXY_WARMUP_PROBES` / `warmup_probes` | `3` | "
            "good probes before a new upstream takes traffic |") in readme_table()
    example = render_yaml()
    assert yaml.safe_load(example)["warmup_probes"] == 3
    assert "# How many probes a new upstream must pass first.\n# Default: 3.\n" in example
    assert "# CLI: --warmup-probes / --warm-up-probes.  Env: PDPROXY_WARMUP_PROBES.\nwarmup_probes: 3" in example
    assert "\nwarmup_probes = 3\n" in render_toml()


def test_argparse_options_follow_the_annotation() -> None:
    options = {dest: opts for _flags, dest, opts, _help in serve_options()}
    assert options["port"] == {"type": int}
    assert options["connect_timeout"] == {"type": float}
    assert options["log_level"]["choices"] == ("debug", "info", "warning", "error", "critical")
    assert options["access_log"]["action"].__name__ == "BooleanOptionalAction"
    assert options["metrics_port"] == {"type": int}  # int | None
    assert options["state_file"] == {"metavar": "PATH"}


def test_none_defaults_say_what_they_mean() -> None:
    helps = {dest: text for _flags, dest, _opts, text in serve_options()}
    assert helps["metrics_port"].endswith("(default: the main port)")
    assert helps["admin_token"].endswith("(default: none)")
    assert helps["prefill_servers"].endswith("(required)")


# ---------------------------------------------------------------- nested sections in config files


def test_config_file_sections_flatten(tmp_path: Path) -> None:
    path = tmp_path / "pd.yaml"
    path.write_text("timeouts:\n  connect-timeout: 1.5\n  prefill_timeout: 9\nhealth:\n  health_rise: 4\nport: 1\n",
                    encoding="utf-8")
    assert read_config_file(path) == {"connect_timeout": 1.5, "prefill_timeout": 9, "health_rise": 4, "port": 1}


def test_toml_tables_are_sections(tmp_path: Path) -> None:
    path = tmp_path / "pd.toml"
    path.write_text("port = 2\n[ejection]\neject_after = 5\n", encoding="utf-8")
    assert read_config_file(path) == {"port": 2, "eject_after": 5}


def test_a_section_may_share_its_name_with_a_setting(tmp_path: Path) -> None:
    path = tmp_path / "pd.yaml"
    path.write_text("discovery:\n  discovery: dns\n  discovery_interval: 2\n", encoding="utf-8")
    assert read_config_file(path) == {"discovery": "dns", "discovery_interval": 2}
    path.write_text("discovery: dns\n", encoding="utf-8")  # the setting itself, flat
    assert read_config_file(path) == {"discovery": "dns"}
    for name in set(GROUP_TITLES) & set(Settings.model_fields):  # so a mapping there is always the section
        assert "dict" not in str(Settings.model_fields[name].annotation), name


def test_the_example_nested_by_its_headings_loads_the_same(tmp_path: Path) -> None:
    """Each heading of the YAML example names the section its keys may be nested under: nesting every key
    under it reads back the same settings as the flat file."""
    flat = REPO / "config" / "pdproxy.example.yaml"
    nested: dict[str, dict[str, object]] = {}
    section = ""
    for line in flat.read_text(encoding="utf-8").splitlines():
        if line.startswith("# --- "):
            title = line.removeprefix("# --- ").rstrip("- ")
            section = title.split("(section: ")[1].rstrip(")") if "(section: " in title else title
            assert section in GROUP_TITLES, line
        elif line and not line.startswith(("#", " ", "-")) and ":" in line:
            key = line.split(":", 1)[0]
            nested.setdefault(section, {})[key] = yaml.safe_load(line)[key] if not line.endswith(":") else None
    data = yaml.safe_load(flat.read_text(encoding="utf-8"))
    for keys in nested.values():
        for key in keys:
            keys[key] = data[key]  # multi-line values (the server lists) as the file gives them
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(nested), encoding="utf-8")
    assert read_config_file(path) == read_config_file(flat)
    assert len(nested) >= 10


@pytest.mark.parametrize(("text", "expected"), [
    ("timeouts:\n  health_rise: 4\n", "timeouts.health_rise is not a setting of the timeouts section"),
    ("timeouts:\n  nope: 1\n", "timeouts.nope is not a setting of the timeouts section"),
    ("connect_timeout: 1\ntimeouts:\n  connect_timeout: 2\n", "connect_timeout is set twice"),
])
def test_bad_sections_are_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "pd.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected):
        read_config_file(path)


# ---------------------------------------------------------------- flags after the verb


@pytest.mark.parametrize("argv", [
    ["upstreams", "list", "--admin-url", "http://h:1", "--token", "t"],
    ["upstreams", "--admin-url", "http://h:1", "--token", "t", "list"],
    ["upstreams", "--admin-url", "http://other:2", "list", "--admin-url", "http://h:1", "--token", "t"],
])
def test_admin_flags_before_or_after_the_verb(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.action, args.admin_url, args.token) == ("list", "http://h:1", "t")


def test_admin_flags_after_every_verb() -> None:
    for argv in (["add", "prefill", "h:1"], ["remove", "abc"], ["drain", "abc"], ["undrain", "abc"]):
        args = build_parser().parse_args(["upstreams", *argv, "--admin-url", "http://h:9"])
        assert args.admin_url == "http://h:9", argv


def test_admin_url_default_without_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDPROXY_ADMIN_URL", raising=False)
    assert build_parser().parse_args(["upstreams", "list"]).admin_url == "http://127.0.0.1:8000"
