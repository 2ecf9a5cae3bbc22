"""The metric names proxy/metrics.py declares, as a scrape shows them: for the docs and
dashboard tests, so neither keeps its own list."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from proxy.ops import metrics


def declared_metrics() -> dict[str, str]:
    """Name as documented (counters with _total) -> type, of every metric metrics.py declares."""
    out: dict[str, str] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                out[family.name + ("_total" if family.type == "counter" else "")] = family.type
    for collector in (metrics.TLS_FACTS, metrics.INFO, metrics.BACKEND_UP):
        for family in collector.collect():
            out[family.name] = family.type
    return out


def exported_series_names() -> set[str]:
    """Every sample name a scrape can show, suffixes included (no _created: metrics.py turns
    those off)."""
    suffixes = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {name + s for name, kind in declared_metrics().items() for s in suffixes[kind]}
