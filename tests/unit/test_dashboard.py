"""config/grafana-dashboard.json: it parses, every PromQL expression names only series the proxy
exports (from metrics.py's declarations), and it covers what an operator watches."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from metricnames import exported_series_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"

# PromQL words that are not series names: aggregations and their modifiers, set and
# comparison operators, offsets. Functions are recognised by the "(" after them.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "sum", "min", "max", "avg", "count", "topk", "bottomk",
             "quantile", "stddev", "stdvar", "count_values", "group", "inf", "nan"}
_FUNCTIONS = {"rate", "irate", "increase", "histogram_quantile", "time", "clamp_min", "clamp_max",
              "label_values", "abs", "delta", "deriv", "timestamp", "vector", "scalar",
              "sort", "sort_desc", "absent", "max_over_time", "min_over_time", "sum", "min",
              "max", "avg", "count", "topk", "bottomk"}


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(doc: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["definition"])
    return out


def series_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers outside strings, label matchers,
    ranges and grouping lists, that are neither keywords nor called as functions."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings ($instance, label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges ([5m], [$__rate_interval])
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        called = text[match.end():].lstrip().startswith("(")
        if called:
            assert word in _FUNCTIONS, f"unknown PromQL function {word!r} in {expr}"
            continue
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    # label_values(metric, label): its second argument is a label, not a series
    lv = re.match(r"label_values\((\w+),\s*\w+\)$", expr)
    if lv:
        names = {lv.group(1)}
    return names


def test_parser_of_this_test_sees_series_and_only_series() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(dwsproxy_tls_handshake_seconds_bucket'
            '{instance=~"$instance", le!="x"}[$__rate_interval]))) / on (instance) up')
    assert series_names(expr) == {"dwsproxy_tls_handshake_seconds_bucket", "up"}
    assert series_names("time() - max(dwsproxy_x)") == {"dwsproxy_x"}


def test_every_expression_names_only_exported_series() -> None:
    exported = exported_series_names()
    exprs = expressions(load())
    assert len(exprs) >= 15
    for expr in exprs:
        names = series_names(expr)
        assert names, f"no series in {expr}"
        assert names <= exported, f"{expr}: {names - exported} not exported by the proxy"


def test_dashboard_covers_the_operators_questions() -> None:
    used = set().union(*(series_names(e) for e in expressions(load())))
    for name in ("dwsproxy_connections_total", "dwsproxy_connections_rejected_total",
                 "dwsproxy_tls_handshake_seconds_bucket",
                 "dwsproxy_certificate_expiry_timestamp_seconds",
                 "dwsproxy_crl_next_update_timestamp_seconds", "dwsproxy_config_reloads_total",
                 "dwsproxy_config_last_reload_success_timestamp_seconds",
                 "dwsproxy_backend_tls_failures_total", "dwsproxy_cancel_requests_total",
                 "dwsproxy_sessions_terminated_total", "dwsproxy_active_connections"):
        assert name in used, name
    text = " ".join(expressions(load()))
    assert "by (encryption)" in text and "by (tls_version" in text and "by (reason)" in text


def test_dashboard_is_importable() -> None:
    doc = load()
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in panels(doc):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


@pytest.mark.parametrize("expr", ["sum(rate(dwsproxy_connections[5m]))",
                                  "dwsproxy_tls_handshake_seconds",
                                  "rate(dwsproxy_connections_rejected_total_created[5m])"])
def test_a_name_the_proxy_does_not_export_is_caught(expr: str) -> None:
    assert not series_names(expr) <= exported_series_names()
