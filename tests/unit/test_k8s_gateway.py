"""config/k8s-gateway.yaml, the fleet example: several replicas behind a Service, a
PodDisruptionBudget, a preStop that fits inside the drain, readiness on /readyz, liveness on
/livez, and the file watcher instead of a reloader sidecar. Validated as
tests/unit/test_deploy_files.py validates the sidecar example (no cluster needed)."""

from __future__ import annotations

import base64
import posixpath
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_files import container_port, one, visible_files

from proxy.config.schema import parse

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "config" / "k8s-gateway.yaml"
CONFIG_PATH = "/etc/dwsproxy/dwsproxy.toml"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    found = [d for d in yaml.safe_load_all(GATEWAY.read_text(encoding="utf-8")) if d]
    for doc in found:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"]["name"], doc
    return found


def kind(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found: dict[str, Any] = one([d for d in docs if d["kind"] == name], name)
    return found


@pytest.fixture(scope="module")
def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return kind(docs, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


@pytest.fixture(scope="module")
def proxy(pod: dict[str, Any]) -> dict[str, Any]:
    # The only container: no reloader sidecar beside it.
    container: dict[str, Any] = one(pod["spec"]["containers"], "container (no sidecar)")
    assert container["name"] == "dwsproxy"
    return container


@pytest.fixture(scope="module")
def toml_text(docs: list[dict[str, Any]]) -> str:
    text: str = kind(docs, "ConfigMap")["data"]["dwsproxy.toml"]
    return text


def test_the_config_is_accepted_and_watches_its_files(toml_text: str) -> None:
    cfg = parse(toml_text, CONFIG_PATH)  # ConfigError naming the key otherwise
    assert cfg.reload.watch is True and cfg.reload.watch_interval <= 5
    assert cfg.tls.require_ssl and cfg.tls.clientcert == "verify-full"
    assert cfg.backend.sslmode == "verify-ca" and cfg.backend.sslrootcert
    assert (cfg.listen.host, cfg.metrics.host) == ("0.0.0.0", "0.0.0.0")


def test_several_replicas_rolled_without_losing_capacity(deployment: dict[str, Any]) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] >= 3
    rolling = spec["strategy"]["rollingUpdate"]
    assert spec["strategy"]["type"] == "RollingUpdate" and rolling["maxUnavailable"] == 0


def test_a_disruption_budget_covers_the_replicas(docs: list[dict[str, Any]],
                                                deployment: dict[str, Any],
                                                pod: dict[str, Any]) -> None:
    pdb = kind(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    labels = pod["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < replicas
    else:
        assert 1 <= pdb["spec"]["minAvailable"] < replicas


def test_prestop_and_drain_fit_in_the_grace_period(pod: dict[str, Any], proxy: dict[str, Any],
                                                   toml_text: str) -> None:
    """preStop first (endpoints stop routing here), then SIGTERM and the proxy's own drain of
    listen.shutdown_grace: both must end before the kubelet's SIGKILL."""
    command = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop = float(command[1])
    grace = parse(toml_text, CONFIG_PATH).listen.shutdown_grace
    assert 0 < pre_stop <= 15
    assert pre_stop + grace < pod["spec"]["terminationGracePeriodSeconds"]


def test_readiness_on_readyz_liveness_on_livez(proxy: dict[str, Any], toml_text: str) -> None:
    metrics_port = parse(toml_text, CONFIG_PATH).metrics.port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = proxy[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(proxy, get["port"]) == metrics_port, probe


def test_files_are_mounted_where_the_config_names_them_and_can_be_updated(
        docs: list[dict[str, Any]], pod: dict[str, Any], proxy: dict[str, Any],
        toml_text: str) -> None:
    files = visible_files(pod, proxy)  # refuses subPath mounts, which never see updates
    args = proxy["args"]
    assert args[args.index("--config") + 1] == CONFIG_PATH
    assert files[CONFIG_PATH][:3] == ("ConfigMap", kind(docs, "ConfigMap")["metadata"]["name"],
                                      "dwsproxy.toml")
    raw = tomllib.loads(toml_text)
    named = [raw["tls"][k] for k in ("ssl_cert_file", "ssl_key_file", "ssl_ca_file",
                                     "ssl_crl_file")] + [raw["backend"]["sslrootcert"]]
    secret = kind(docs, "Secret")
    for value in named:
        path = posixpath.normpath(posixpath.join(posixpath.dirname(CONFIG_PATH), value))
        assert path in files, f"{value} is not a mounted file"
        assert files[path][:2] == ("Secret", secret["metadata"]["name"])
        assert files[path][3] & 0o237 == 0, f"{value}: mode {files[path][3]:04o}"
    for key, value in secret["data"].items():
        assert base64.b64decode(value, validate=True) == b"REPLACE", key
    assert pod["spec"]["securityContext"]["fsGroup"] == proxy["securityContext"]["runAsGroup"]


def test_the_service_reaches_the_proxies_only(docs: list[dict[str, Any]], pod: dict[str, Any],
                                             proxy: dict[str, Any]) -> None:
    service = kind(docs, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port = one(service["spec"]["ports"], "Service port")
    assert container_port(proxy, port["targetPort"]) == 6432


def test_runs_as_non_root_with_a_read_only_root(pod: dict[str, Any],
                                                proxy: dict[str, Any]) -> None:
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    ctx = proxy["securityContext"]
    assert ctx["runAsUser"] != 0 and ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True and ctx["capabilities"]["drop"] == ["ALL"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
