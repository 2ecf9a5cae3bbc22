"""dwsproxy_build_info and dwsproxy_config_info as a scrape shows them: one series each, the
configuration's digest the one /status shows, and after a reload only the new one."""

from __future__ import annotations

import platform
import signal
import ssl
from collections.abc import Callable

import pytest
from conftest import Proxy

from proxy.ops.admin import version


def info_series(proxy: Proxy, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample, labels), value in proxy.metrics().items()
            if sample == name and value == 1]


@pytest.mark.parametrize("workers", [1, 2])
def test_build_and_config_info(start_proxy: Callable[..., Proxy], workers: int) -> None:
    proxy = start_proxy(listen={"workers": workers}, reload={"watch": False})
    assert info_series(proxy, "dwsproxy_build_info") == [
        {"version": version(), "python": platform.python_version(),
         "openssl": ssl.OPENSSL_VERSION}]
    status = proxy.admin_json("/status")  # the [admin] listener
    before = status["config"]["snapshot_sha256"]
    assert info_series(proxy, "dwsproxy_config_info") == [{"sha256": before}]

    proxy.config_path.write_text(proxy.config_path.read_text().replace(
        "startup_timeout = 5.0", "startup_timeout = 6.0"))
    proxy.signal(signal.SIGHUP)
    proxy.wait_metric("dwsproxy_config_reloads_total", 1, result="success")
    after = proxy.admin_json("/status")["config"]["snapshot_sha256"]
    assert after != before
    assert info_series(proxy, "dwsproxy_config_info") == [{"sha256": after}]
