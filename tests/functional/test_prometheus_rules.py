"""The alert rules, checked and unit-tested by Debian's promtool (.ci/run installs the prometheus package)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import needs_tool

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests"
PROMTOOL = shutil.which("promtool")
pytestmark = needs_tool(PROMTOOL, "promtool: apt-get install prometheus; .ci/run installs it")


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is not installed (.ci/run installs prometheus)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_the_example_prometheus_config_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_every_alert_has_its_own_unit_test() -> None:
    tests = {path.name.removesuffix(".test.yml") for path in RULE_TESTS.glob("*.test.yml")}
    assert sorted(tests) == sorted(alert_names())
    for name in tests:
        spec = yaml.safe_load((RULE_TESTS / f"{name}.test.yml").read_text(encoding="utf-8"))
        checked = {case["alertname"] for test in spec["tests"] for case in test["alert_rule_test"]}
        assert checked == {name}, f"{name}.test.yml tests {checked}"
        fired = [case for test in spec["tests"] for case in test["alert_rule_test"] if case.get("exp_alerts")]
        quiet = [case for test in spec["tests"] for case in test["alert_rule_test"] if not case.get("exp_alerts")]
        assert fired and quiet, f"{name}: test both that it fires and that it stays quiet"


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", *sorted(p.name for p in RULE_TESTS.glob("*.test.yml")), cwd=RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(alert_names())


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: raise the error-ratio threshold tenfold and its test must say so."""
    broken = re.sub(r"\) > 0\.05\n", ") > 0.5\n", ALERTS.read_text(encoding="utf-8"), count=1)
    assert broken != ALERTS.read_text(encoding="utf-8")
    (tmp_path / "alerts.yml").write_text(broken, encoding="utf-8")
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS / "PdproxyHighErrorRatio.test.yml", tmp_path / "tests")
    result = promtool("test", "rules", "PdproxyHighErrorRatio.test.yml", cwd=tmp_path / "tests")
    assert result.returncode != 0
    assert "PdproxyHighErrorRatio" in result.stdout + result.stderr
