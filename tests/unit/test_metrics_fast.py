"""metrics.py's per-connection updates, which call prometheus-client's value objects directly,
read back through the public registry: a library that changes those internals fails here."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from proxy import metrics


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_counters_and_the_gauge_move_as_their_public_methods_would() -> None:
    before = {
        "s": sample("dwsproxy_ssl_requests_total", response="S"),
        "ok": sample("dwsproxy_connections_total", encryption="tls", tls_version="TLSv1.3",
                     client_cert="verified", backend_encryption="plain"),
        "active": sample("dwsproxy_active_connections", encryption="tls"),
        "c2b": sample("dwsproxy_bytes_total", direction="client_to_backend"),
        "b2c": sample("dwsproxy_bytes_total", direction="backend_to_client"),
    }
    metrics.ssl_request("S")
    metrics.accepted("tls", "TLSv1.3", True, False)
    metrics.accepted("tls", "TLSv1.3", True, False)
    metrics.active("tls", 1)
    metrics.add_bytes(100, 0)
    metrics.add_bytes(5, 7)
    assert sample("dwsproxy_ssl_requests_total", response="S") == before["s"] + 1
    assert sample("dwsproxy_connections_total", encryption="tls", tls_version="TLSv1.3",
                  client_cert="verified", backend_encryption="plain") == before["ok"] + 2
    assert sample("dwsproxy_active_connections", encryption="tls") == before["active"] + 1
    metrics.active("tls", -1)
    assert sample("dwsproxy_active_connections", encryption="tls") == before["active"]
    assert sample("dwsproxy_bytes_total", direction="client_to_backend") == before["c2b"] + 105
    assert sample("dwsproxy_bytes_total", direction="backend_to_client") == before["b2c"] + 7


@pytest.mark.parametrize("amount", [0.0, 0.0005, 0.001, 0.0011, 0.003, 10.0, 11.0, math.inf])
def test_a_histogram_observation_lands_where_histogram_observe_puts_it(amount: float) -> None:
    name = "dwsproxy_tls_handshake_seconds"
    bounds = [*metrics.HANDSHAKE_SECONDS._upper_bounds]
    labels = ["+Inf" if b == math.inf else str(b) for b in bounds]
    before = [sample(f"{name}_bucket", le=le) for le in labels]
    count, total = sample(f"{name}_count"), sample(f"{name}_sum")
    metrics.handshake_seconds(amount)
    after = [sample(f"{name}_bucket", le=le) for le in labels]
    # cumulative buckets: every bucket whose bound is >= amount went up by one, no other
    assert [a - b for a, b in zip(after, before, strict=True)] == \
        [1.0 if amount <= bound else 0.0 for bound in bounds]
    assert sample(f"{name}_count") == count + 1
    if math.isfinite(amount):
        assert sample(f"{name}_sum") == pytest.approx(total + amount)
