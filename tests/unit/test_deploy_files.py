"""The deployment files: Dockerfile, config/k8s-sidecar.yaml, config/prometheus-alerts.yaml.

Owns: checking that these files parse, agree with each other and with the config and metrics
contracts, and that the image's HEALTHCHECK command really tells 200 from 503. Must not: need a
Docker engine, a cluster or a Prometheus server (promtool is used only when it is installed).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "config" / "k8s-sidecar.yaml"
ALERTS = ROOT / "config" / "prometheus-alerts.yaml"

CONFIG_PATH = "/etc/dwsproxy/dwsproxy.toml"
CLIENT_PORT = 6432
METRICS_PORT = 9187

# The config contract (shared/spec/config.md): sections and the keys each may hold.
CONTRACT_KEYS: dict[str, set[str]] = {
    "listen": {"host", "port", "workers", "max_connections", "startup_timeout", "idle_timeout"},
    "backend": {"host", "port", "connect_timeout", "sslmode", "sslrootcert", "sslcert", "sslkey"},
    "tls": {
        "ssl", "require_ssl", "ssl_cert_file", "ssl_key_file", "ssl_passphrase_file",
        "ssl_ca_file", "ssl_crl_file", "ssl_crl_dir", "clientcert", "clientname",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version", "ssl_ciphers", "direct_ssl",
    },
    "rules": {
        "type", "user", "database", "application_name", "address", "ssl_protocols",
        "clientcert", "action",
    },
    "metrics": {"host", "port"},
    # the third round's contract (config.md): the admin views on their own listener
    "admin": {"enabled", "host", "port", "token_file"},
}
TLS_FILE_KEYS = ("ssl_cert_file", "ssl_key_file", "ssl_ca_file", "ssl_crl_file")
SECRET_KEYS = {"server.crt", "server.key", "cacert.pem", "crl.pem"}

ALERT_METRICS = {
    "dwsproxy_certificate_expiry_timestamp_seconds",
    "dwsproxy_crl_next_update_timestamp_seconds",
    "dwsproxy_config_reloads_total",
    "dwsproxy_connections_rejected_total",
    "dwsproxy_connections_total",
    "up",
}
ALERT_NAMES = {
    "DwsproxyCertificateExpiringSoon",
    "DwsproxyCrlExpiringSoon",
    "DwsproxyCrlExpired",
    "DwsproxyConfigReloadFailed",
    "DwsproxyHighRejectionRate",
    "DwsproxyDown",
}


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with `\\` continuations joined.

    As in Docker, comment lines are dropped even inside a continued instruction, and so are
    blank lines there.
    """
    instructions: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, rest = joined.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a `\\` continuation"
    return instructions


def argv_of(form: str) -> list[str]:
    """Exec form (a JSON array) or shell form, as a list of words."""
    form = form.strip()
    if form.startswith("["):
        argv = json.loads(form)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return argv
    return shlex.split(form)


def only(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in instructions if kw == keyword]


def healthcheck_argv(instructions: list[tuple[str, str]]) -> list[str]:
    checks = only(instructions, "HEALTHCHECK")
    assert len(checks) == 1, "exactly one HEALTHCHECK"
    words = checks[0].split(" ")
    while words and words[0].startswith("--"):
        words.pop(0)
    assert words and words[0].upper() == "CMD", "HEALTHCHECK [OPTIONS] CMD ..."
    return argv_of(" ".join(words[1:]))


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_continuations_are_joined() -> None:
    text = "FROM x\n# c\nRUN a \\\n    # inside\n\n    && b \\\n    && c\nUSER 1\n"
    assert dockerfile_instructions(text) == [
        ("FROM", "x"), ("RUN", "a && b && c"), ("USER", "1"),
    ]


def test_dockerfile_from_python_311_slim(docker: list[tuple[str, str]]) -> None:
    froms = only(docker, "FROM")
    assert froms, "no FROM"
    image = froms[-1].split()[0]  # the stage that ships
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?", image), image


def test_dockerfile_runs_as_non_root(docker: list[tuple[str, str]]) -> None:
    users = only(docker, "USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    last_user = max(i for i, (kw, _) in enumerate(docker) if kw == "USER")
    last_run = max(i for i, (kw, _) in enumerate(docker) if kw == "RUN")
    assert last_user > last_run, "installing as the runtime user: USER belongs after the RUNs"


def test_dockerfile_exposes_client_and_metrics_ports(docker: list[tuple[str, str]]) -> None:
    ports = {p.split("/")[0] for rest in only(docker, "EXPOSE") for p in rest.split()}
    assert {str(CLIENT_PORT), str(METRICS_PORT)} <= ports


def test_dockerfile_runs_dwsproxy_with_the_config(docker: list[tuple[str, str]]) -> None:
    entrypoint = only(docker, "ENTRYPOINT")
    cmd = only(docker, "CMD")
    argv = (argv_of(entrypoint[-1]) if entrypoint else []) + (argv_of(cmd[-1]) if cmd else [])
    assert argv == ["dwsproxy", "--config", CONFIG_PATH]
    assert only(docker, "STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_copies_what_pip_install_reads(docker: list[tuple[str, str]]) -> None:
    # pyproject's readme and packages must be in the build, or `pip install` fails in it.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {pkg.split(".")[0] for pkg in found}
    copied: set[str] = set()
    for rest in only(docker, "COPY"):
        words = [w for w in argv_of(rest) if not w.startswith("--")]
        copied |= {w.rstrip("/") for w in words[:-1]}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    assert any("pip install" in rest for rest in only(docker, "RUN"))


def test_dockerfile_healthcheck_targets_healthz(docker: list[tuple[str, str]]) -> None:
    argv = healthcheck_argv(docker)
    assert any(f"127.0.0.1:{METRICS_PORT}/healthz" in word for word in argv), argv
    assert posixpath.basename(argv[0]).startswith("python"), "slim images have no curl"


class _Healthz(http.server.BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        code = type(self).status if self.path == "/healthz" else 404
        body = b"ok\n" if code == 200 else b"unhealthy\n"
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass  # keep pytest's output clean


@pytest.fixture
def healthz_server() -> Iterator[tuple[int, type[_Healthz]]]:
    handler = type("Healthz", (_Healthz,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_healthcheck(docker: list[tuple[str, str]], port: int) -> subprocess.CompletedProcess[str]:
    argv = healthcheck_argv(docker)
    argv = [sys.executable] + [w.replace(f":{METRICS_PORT}", f":{port}") for w in argv[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_dockerfile_healthcheck_command(
    docker: list[tuple[str, str]],
    healthz_server: tuple[int, type[_Healthz]],
    status: int,
    healthy: bool,
) -> None:
    port, handler = healthz_server
    handler.status = status
    result = run_healthcheck(docker, port)
    assert handler.paths == ["/healthz"]
    assert (result.returncode == 0) is healthy, result.stderr


def test_dockerfile_healthcheck_fails_when_nothing_listens(docker: list[tuple[str, str]]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(docker, port).returncode != 0


# --- Kubernetes example -------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), doc
        assert doc["metadata"]["name"]
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(items: list[Any], what: str) -> Any:
    assert len(items) == 1, f"expected exactly one {what}, found {len(items)}"
    return items[0]


@pytest.fixture(scope="module")
def pod(k8s: list[dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = one(of_kind(k8s, "Deployment"), "Deployment")["spec"]["template"]
    return template


@pytest.fixture(scope="module")
def proxy_container(pod: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = one(
        [c for c in pod["spec"]["containers"] if c["name"] == "dwsproxy"], "dwsproxy container"
    )
    return found


@pytest.fixture(scope="module")
def tls_secret(k8s: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = one(
        [s for s in of_kind(k8s, "Secret") if "server.key" in s.get("data", {})],
        "Secret holding server.key",
    )
    return found


@pytest.fixture(scope="module")
def proxy_toml(k8s: list[dict[str, Any]]) -> dict[str, Any]:
    maps = [m for m in of_kind(k8s, "ConfigMap") if "dwsproxy.toml" in m.get("data", {})]
    return tomllib.loads(one(maps, "ConfigMap with dwsproxy.toml")["data"]["dwsproxy.toml"])


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    by_name = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert port in by_name, f"no container port named {port!r}"
    return int(by_name[port])


def visible_files(
    pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, tuple[str, str, str, int]]:
    """Path in the container -> (ConfigMap|Secret, object name, key, mode) for every file that
    a configMap, secret or projected volume puts there."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    files: dict[str, tuple[str, str, str, int]] = {}
    for mount in container.get("volumeMounts", []):
        assert "subPath" not in mount, "subPath mounts never see Secret/ConfigMap updates"
        volume = volumes[mount["name"]]
        sources: list[tuple[str, dict[str, Any], int]] = []
        if "configMap" in volume:
            src = volume["configMap"]
            sources.append(("ConfigMap", src, src.get("defaultMode", 0o644)))
        elif "secret" in volume:
            src = dict(volume["secret"], name=volume["secret"]["secretName"])
            sources.append(("Secret", src, src.get("defaultMode", 0o644)))
        elif "projected" in volume:
            mode = volume["projected"].get("defaultMode", 0o644)
            for source in volume["projected"]["sources"]:
                for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                    if field in source:
                        sources.append((kind, source[field], mode))
        for kind, src, mode in sources:
            items = src.get("items")
            assert items, f"{kind} {src['name']}: list items so the mounted files are explicit"
            for item in items:
                path = posixpath.join(mount["mountPath"], item["path"])
                files[path] = (kind, src["name"], item["key"], item.get("mode", mode))
    return files


def test_k8s_has_the_expected_objects(k8s: list[dict[str, Any]]) -> None:
    kinds = [d["kind"] for d in k8s]
    for kind in ("Secret", "ConfigMap", "Deployment", "Service"):
        assert kind in kinds


def test_k8s_secret_holds_only_dummy_values(tls_secret: dict[str, Any]) -> None:
    assert tls_secret["type"] == "Opaque"
    assert set(tls_secret["data"]) == SECRET_KEYS
    for key, value in tls_secret["data"].items():
        assert base64.b64decode(value, validate=True) == b"REPLACE", key
    assert "PRIVATE KEY" not in K8S.read_text(encoding="utf-8")


def test_k8s_pod_is_scraped(pod: dict[str, Any]) -> None:
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }


def test_k8s_proxy_container_ports(proxy_container: dict[str, Any]) -> None:
    ports = {p["containerPort"] for p in proxy_container["ports"]}
    assert ports == {CLIENT_PORT, METRICS_PORT}


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_k8s_probes_use_healthz(proxy_container: dict[str, Any], probe: str) -> None:
    get = proxy_container[probe]["httpGet"]
    assert get["path"] == "/healthz"
    assert container_port(proxy_container, get["port"]) == METRICS_PORT


def test_k8s_runs_as_non_root(
    pod: dict[str, Any], proxy_container: dict[str, Any], docker: list[tuple[str, str]]
) -> None:
    pod_ctx = pod["spec"].get("securityContext", {})
    for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        ctx = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, container["name"]
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 0, container["name"]
        assert ctx.get("allowPrivilegeEscalation") is False, container["name"]
    image_uid = only(docker, "USER")[-1].split(":")[0]
    assert str(proxy_container["securityContext"]["runAsUser"]) == image_uid


def test_k8s_secret_is_mounted_readable_only_as_postgres_allows(
    pod: dict[str, Any], proxy_container: dict[str, Any], tls_secret: dict[str, Any]
) -> None:
    files = visible_files(pod, proxy_container)
    mounted = {key: mode for kind, name, key, mode in files.values()
               if kind == "Secret" and name == tls_secret["metadata"]["name"]}
    assert set(mounted) == SECRET_KEYS
    for key, mode in mounted.items():
        # Root-owned (as kubelet writes them): no write bits, nothing for others, and at most
        # group read, which PostgreSQL's rule (and dwsproxy's) allows for a root-owned key.
        assert mode & 0o237 == 0, f"{key}: mode {mode:04o}"
    # The group read only reaches the proxy's uid through fsGroup.
    assert pod["spec"]["securityContext"]["fsGroup"] == proxy_container["securityContext"][
        "runAsGroup"
    ]


def test_k8s_config_and_certificates_are_where_the_toml_says(
    pod: dict[str, Any],
    proxy_container: dict[str, Any],
    tls_secret: dict[str, Any],
    proxy_toml: dict[str, Any],
) -> None:
    files = visible_files(pod, proxy_container)
    args = proxy_container.get("args") or ["--config", CONFIG_PATH]  # else the image's CMD
    config_path = args[args.index("--config") + 1]
    assert files[config_path][:3] == ("ConfigMap", "dwsproxy-config", "dwsproxy.toml")
    base = posixpath.dirname(config_path)
    for key in TLS_FILE_KEYS:
        value = proxy_toml["tls"][key]
        path = posixpath.normpath(posixpath.join(base, value))  # relative to the file's folder
        assert path in files, f"tls.{key} = {value!r} is not a mounted file"
        kind, name, _, _ = files[path]
        assert (kind, name) == ("Secret", tls_secret["metadata"]["name"]), key


def test_k8s_toml_follows_the_contract(
    proxy_toml: dict[str, Any], proxy_container: dict[str, Any]
) -> None:
    assert set(proxy_toml) <= set(CONTRACT_KEYS)
    for section, body in proxy_toml.items():
        tables = body if section == "rules" else [body]
        for table in tables:
            unknown = set(table) - CONTRACT_KEYS[section]
            assert not unknown, f"[{section}] keys outside the contract: {sorted(unknown)}"
    assert proxy_toml["tls"]["ssl"] is True
    assert proxy_toml["tls"]["require_ssl"] is True
    assert proxy_toml["listen"] == {"host": "0.0.0.0", "port": CLIENT_PORT}
    assert proxy_toml["metrics"] == {"host": "0.0.0.0", "port": METRICS_PORT}
    backend = proxy_toml["backend"]
    assert (backend["host"], backend["port"], backend["sslmode"]) == (
        "127.0.0.1", 5432, "disable",
    )


def test_k8s_toml_is_accepted_by_the_config_module(k8s: list[dict[str, Any]]) -> None:
    # Imported here, not skipped when missing: a moved or renamed parser must fail this test.
    from proxy.config.schema import parse

    cm = next(m for m in of_kind(k8s, "ConfigMap") if "dwsproxy.toml" in m.get("data", {}))
    parse(cm["data"]["dwsproxy.toml"], CONFIG_PATH)  # raises ConfigError naming the key


def test_k8s_database_listens_on_loopback_only(pod: dict[str, Any]) -> None:
    others = [c for c in pod["spec"]["containers"] if c["name"] != "dwsproxy"]
    database = one(others, "database container")
    assert database["image"] == "postgres:15"
    assert "listen_addresses=127.0.0.1" in database.get("args", [])
    assert not database.get("ports"), "the database must not be reachable from outside the pod"


def test_k8s_service_exposes_only_the_proxy(
    k8s: list[dict[str, Any]], pod: dict[str, Any], proxy_container: dict[str, Any]
) -> None:
    service = one(of_kind(k8s, "Service"), "Service")
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    port = one(service["spec"]["ports"], "Service port")
    assert port["port"] == CLIENT_PORT
    assert container_port(proxy_container, port.get("targetPort", port["port"])) == CLIENT_PORT


# --- Prometheus alerts --------------------------------------------------------------------


@pytest.fixture(scope="module")
def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    named = {rule["alert"]: rule for rule in rules}
    assert len(named) == len(rules), "duplicate alert names"
    return named


_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                 "group_right", "offset", "bool"}


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects: identifiers not called as functions."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)     # string literals
    text = re.sub(r"\{[^}]*\}", "", text)               # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)              # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"(?<![\w:])\d[\w.]*", "", text)      # numbers and durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0) not in _PROMQL_WORDS:
            names.add(match.group(0))
    return names


def squash(expr: str) -> str:
    return " ".join(expr.split())


def test_metric_names_helper() -> None:
    expr = 'sum by (job) (rate(a_total{x="y z"}[5m])) / on(job) b offset 15m > 0.1 and time() < 1e3'
    assert metric_names(expr) == {"a_total", "b"}


def test_alerts_are_the_six_expected(alerts: dict[str, dict[str, Any]]) -> None:
    assert set(alerts) == ALERT_NAMES


@pytest.mark.parametrize("name", sorted(ALERT_NAMES))
def test_alert_is_complete(alerts: dict[str, dict[str, Any]], name: str) -> None:
    rule = alerts[name]
    names = metric_names(rule["expr"])
    assert names, "selects no metric"
    assert names <= ALERT_METRICS, f"unknown metrics: {sorted(names - ALERT_METRICS)}"
    # Every rule states its `for`; the instant ones say 0s, deliberately.
    assert re.fullmatch(r"\d+(ms|s|m|h|d|w|y)", str(rule.get("for", ""))), rule.get("for")
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"].strip()
    assert rule["annotations"]["description"].strip()


def test_alert_thresholds(alerts: dict[str, dict[str, Any]]) -> None:
    expr = {name: squash(rule["expr"]) for name, rule in alerts.items()}
    assert ("dwsproxy_certificate_expiry_timestamp_seconds - time() < 14 * 86400"
            in expr["DwsproxyCertificateExpiringSoon"])
    assert "dwsproxy_crl_next_update_timestamp_seconds < time()" in expr["DwsproxyCrlExpired"]
    assert ("dwsproxy_crl_next_update_timestamp_seconds - time() < 3 * 86400"
            in expr["DwsproxyCrlExpiringSoon"])
    assert ('increase(dwsproxy_config_reloads_total{result="failure"}[15m]) > 0'
            in expr["DwsproxyConfigReloadFailed"])
    assert 'up{job="dwsproxy"} == 0' in expr["DwsproxyDown"]
    rejection = expr["DwsproxyHighRejectionRate"]
    assert alerts["DwsproxyHighRejectionRate"]["for"] == "10m"
    assert rejection.endswith("> 0.1")
    assert ") > 0 )" in rejection, "the denominator must be filtered to > 0"
    assert {"dwsproxy_connections_total", "dwsproxy_connections_rejected_total"} <= (
        metric_names(rejection)
    )


def test_alerts_pass_promtool() -> None:
    assert shutil.which("promtool"), "promtool missing: .ci/system-deps installs prometheus"
    result = subprocess.run(
        ["promtool", "check", "rules", os.fspath(ALERTS)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# A CRL whose nextUpdate is 4 days after the start of the test's clock (promtool's time() is
# the evaluation time, from 0), scraped every minute: DwsproxyCrlExpiringSoon must fire with
# 3 days left, and DwsproxyCrlExpired only once it has lapsed.
CRL_LABELS = {"instance": "p:9187", "job": "dwsproxy", "issuer": "CN=ca"}


def _render(text: str, value: str) -> str:
    """The three template expressions these two alerts use, as Prometheus renders them."""
    return (text.replace("{{ $labels.instance }}", CRL_LABELS["instance"])
            .replace("{{ $labels.issuer }}", CRL_LABELS["issuer"])
            .replace("{{ $value | humanizeDuration }}", value))


def test_crl_expiring_soon_fires_days_before_the_outage(
        alerts: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """`promtool test rules` over the shipped file: the warning is up from 3 days before
    nextUpdate (after its 15 minutes), and the critical DwsproxyCrlExpired only after it."""
    assert shutil.which("promtool"), "promtool missing: .ci/system-deps installs prometheus"

    def firing(name: str, value: str = "") -> list[dict[str, Any]]:
        rule = alerts[name]
        return [{"exp_labels": {**CRL_LABELS, "severity": rule["labels"]["severity"]},
                 "exp_annotations": {k: _render(v, value)
                                     for k, v in rule["annotations"].items()}}]

    soon, expired = "DwsproxyCrlExpiringSoon", "DwsproxyCrlExpired"
    cases = [
        ("23h", soon, []),                      # 3 days 1 hour left: quiet
        ("1d10m", soon, []),                    # under 3 days for 10 minutes: pending
        ("1d20m", soon, firing(soon, "2d 23h 40m 0s")),
        ("3d23h", expired, []),                 # one hour before the outage: not yet
        ("3d23h", soon, firing(soon, "1h 0m 0s")),
        ("4d10m", expired, firing(expired)),
    ]
    doc = {
        "rule_files": [os.fspath(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{
                "series": "dwsproxy_crl_next_update_timestamp_seconds{"
                          + ", ".join(f'{k}="{v}"' for k, v in CRL_LABELS.items()) + "}",
                "values": "345600x6000"}],
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": exp}
                                for at, name, exp in cases],
        }],
    }
    case = tmp_path / "crl_alerts_test.yaml"
    case.write_text(yaml.safe_dump(doc))
    result = subprocess.run(["promtool", "test", "rules", os.fspath(case)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
