"""The docs under docs/ against the code: config keys (config.SCHEMA, what the parser accepts)
and metric names (what metrics.py declares), both ways; the README stays inside the repo."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from metricnames import declared_metrics, exported_series_names

from proxy.config import schema as config
from proxy.ops import metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_SECTION = re.compile(r"^## `\[{1,2}(\w+)\]{1,2}`\s*$")
_ROW = re.compile(r"^\| `(\w+)` \|")


def documented_keys() -> dict[str, dict[str, list[str]]]:
    """section -> key -> the row's cells, from docs/configuration.md's tables."""
    out: dict[str, dict[str, list[str]]] = {}
    section: str | None = None
    for line in (DOCS / "configuration.md").read_text().splitlines():
        heading = _SECTION.match(line)
        if heading:
            section = heading.group(1)
            assert section not in out, f"section {section} documented twice"
            out[section] = {}
        elif line.startswith("## "):
            section = None
        elif section is not None and (row := _ROW.match(line)):
            key = row.group(1)
            assert key not in out[section], f"{section}.{key} documented twice"
            out[section][key] = [c.strip() for c in line.strip().strip("|").split("|")]
    return out


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    docs = documented_keys()
    code = {section: set(keys) for section, keys in config.SCHEMA.items()}
    assert set(docs) == set(code), "sections differ between config.SCHEMA and the docs"
    for section, keys in code.items():
        assert keys - set(docs[section]) == set(), f"[{section}] keys missing from the docs"
        assert set(docs[section]) - keys == set(), f"[{section}] keys documented but unknown"


_DATACLASSES: dict[str, type[Any]] = {
    "listen": config.ListenConfig, "backend": config.BackendConfig, "tls": config.TlsConfig,
    "rules": config.Rule, "metrics": config.MetricsConfig,
    "reload": config.ReloadConfig, "admin": config.AdminConfig}


def test_schema_matches_the_dataclasses() -> None:
    """Every declared key is a field of its frozen dataclass (parse() builds it with **kwargs),
    and every field but a rule's position is a key."""
    for section, cls in _DATACLASSES.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {"index"}
        assert fields == set(config.SCHEMA[section]), section


def _toml_value(cell: str) -> tuple[bool, Any]:
    literal = re.fullmatch(r"`(.*)`(?: \(.*\))?", cell)
    if literal is None:
        return False, None
    return True, tomllib.loads(f"v = {literal.group(1)}")["v"]


@pytest.mark.parametrize("section", sorted(_DATACLASSES))
def test_documented_defaults_are_the_code_defaults(section: str) -> None:
    cls = _DATACLASSES[section]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    checked = 0
    for key, cells in documented_keys()[section].items():
        is_literal, value = _toml_value(cells[2])
        if not is_literal:  # "required", "none (any address)": no TOML value to compare
            continue
        expected = defaults[key]
        if isinstance(expected, tuple):
            expected = list(expected)
        assert value == expected, f"{section}.{key}: docs say {cells[2]}, code has {expected!r}"
        checked += 1
    assert checked >= len(config.SCHEMA[section]) - 3  # address, clientcert, action


def test_documented_reload_behaviour_matches_the_restart_only_keys() -> None:
    """server._reload warns that listen.host/port/workers and [metrics] need a restart; the docs
    say "restart" for exactly those."""
    docs = documented_keys()
    restart = {f"{s}.{k}" for s, keys in docs.items() for k, c in keys.items()
               if c[3] == "restart"}
    assert restart == {"listen.host", "listen.port", "listen.workers", "listen.unix_socket_dir",
                       "listen.unix_socket_mode", "listen.unix_socket_group",
                       *(f"metrics.{k}" for k in config.SCHEMA["metrics"]),
                       "admin.enabled", "admin.host", "admin.port"}
    allowed = {"restart", "new connections", "open sessions too", "next look"}
    for section, keys in docs.items():
        for key, cells in keys.items():
            assert cells[3] in allowed, f"{section}.{key}: reload column {cells[3]!r}"


# --- metrics -------------------------------------------------------------------------------


_METRIC_ROW = re.compile(r"^\| `(dwsproxy_\w+)` \|")


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    text = (DOCS / "metrics.md").read_text()
    rows = [m.group(1) for line in text.splitlines() if (m := _METRIC_ROW.match(line))]
    assert len(rows) == len(set(rows)), "a metric documented twice"
    declared = declared_metrics()
    assert len(declared) >= 14
    assert set(declared) - set(rows) == set(), "metrics missing from docs/metrics.md"
    assert set(rows) - set(declared) == set(), "documented metrics that metrics.py lacks"
    # Any other mention (examples, PromQL) names a series that exists.
    mentioned = set(re.findall(r"\bdwsproxy_\w+", text))
    assert mentioned - exported_series_names() - set(declared) == set()


def test_documented_label_values_are_the_declared_ones() -> None:
    text = (DOCS / "metrics.md").read_text()
    for reason in metrics.REJECT_REASONS:
        assert f"`{reason}`" in text, reason
    for reason in (*metrics.BACKEND_TLS_REASONS, *metrics.TERMINATE_REASONS):
        assert f"`{reason}`" in text, reason


# --- the README ------------------------------------------------------------------------------


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)[^)]*\)", path.read_text())


@pytest.mark.parametrize("name", ["README.md", "README.zh-CN.md", *(
    f"docs/{p.name}" for p in sorted(DOCS.glob("*.md")))])
def test_links_stay_inside_the_repo_and_resolve(name: str) -> None:
    page = ROOT / name
    for target in _links(page):
        assert "://" not in target, f"{name}: links outside the repo: {target}"
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{name}: {target} is outside the repo"
        assert resolved.exists(), f"{name}: {target} does not exist"
    assert "shared/spec" not in page.read_text(), name


def test_readme_links_every_doc() -> None:
    links = set(_links(ROOT / "README.md"))
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in links, page.name
    assert "README.zh-CN.md" in links


# --- the Chinese quick start ---------------------------------------------------------------


def test_chinese_quick_start_config_is_one_the_parser_accepts() -> None:
    text = (ROOT / "README.zh-CN.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    cfg = config.parse(blocks[0], "/etc/dwsproxy/dwsproxy.toml")
    assert cfg.tls.require_ssl and cfg.tls.ssl_ca_file == "/etc/dwsproxy/certs/cacert.pem"
    assert [r.application_name for r in cfg.rules] == ["gsql", "*"]


def test_refusal_messages_in_the_quick_starts_are_the_proxys_own_english_ones() -> None:
    source = "".join(p.read_text() for p in (ROOT / "proxy").rglob("*.py"))
    for page in ("README.md", "README.zh-CN.md"):
        messages = re.findall(r"FATAL:\s+([A-Za-z][^`\n(]*[a-z])", (ROOT / page).read_text())
        assert messages, page
        for message in messages:
            assert message in source, f"{page}: {message!r} is not a message the proxy sends"


# --- the example config ----------------------------------------------------------------------

_EXAMPLE = ROOT / "config" / "dwsproxy.toml"
_EXAMPLE_HEADER = re.compile(r"^(?:#\s*)?\[{1,2}(\w+)\]{1,2}")
_EXAMPLE_KEY = re.compile(r"^(#\s*)?(\w+)\s*=\s*(.*)$")


def example_keys() -> dict[str, dict[str, bool]]:
    """section -> key -> whether some line setting it (active, or commented out as an example)
    explains it: a comment after the value, or a comment line just above."""
    out: dict[str, dict[str, bool]] = {}
    section: str | None = None
    previous = ""
    for line in _EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        header = _EXAMPLE_HEADER.match(stripped)
        key = _EXAMPLE_KEY.match(stripped)
        if header:
            section = header.group(1)
        elif key and section is not None:
            explained = bool(re.search(r"\s#", key.group(3))) or (
                previous.startswith("#") and not _EXAMPLE_KEY.match(previous))
            seen = out.setdefault(section, {})
            seen[key.group(2)] = seen.get(key.group(2), False) or explained
        previous = stripped
    return out


def test_the_example_config_has_every_key_commented() -> None:
    """config/dwsproxy.toml shows every key of config.SCHEMA with a comment (the README says
    so): a key added to the schema without an example fails here."""
    example = example_keys()
    for section, keys in config.SCHEMA.items():
        shown = example.get(section, {})
        missing = set(keys) - set(shown)
        assert not missing, f"[{section}] keys missing from config/dwsproxy.toml: {missing}"
        bare = sorted(k for k in keys if not shown[k])
        assert not bare, f"[{section}] keys in config/dwsproxy.toml without a comment: {bare}"
    for section, keys in example.items():
        assert section in config.SCHEMA, f"config/dwsproxy.toml: unknown section {section}"
        unknown = set(keys) - set(config.SCHEMA[section])
        assert not unknown, f"config/dwsproxy.toml [{section}]: unknown keys {unknown}"
