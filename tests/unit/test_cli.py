"""cli.py: log line timestamps (RFC 3339, milliseconds, UTC offset) on a host whose local zone
is not UTC."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from proxy.cli import JsonFormatter, KeyValueFormatter

# 2026-12-06T09:40:52.370 UTC; 17:40:52 in Shanghai.
CREATED = 1796550052.370


@pytest.fixture
def shanghai(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    assert time.localtime(CREATED).tm_gmtoff == 8 * 3600  # the zone really is in force
    yield
    monkeypatch.undo()
    time.tzset()


def record(created: float) -> logging.LogRecord:
    rec = logging.LogRecord("dwsproxy.session", logging.INFO, __file__, 1, "connection", (),
                            None)
    rec.created = created
    rec.fields = {"peer": "127.0.0.1:5000"}  # type: ignore[attr-defined]
    return rec


@pytest.mark.usefixtures("shanghai")
@pytest.mark.parametrize("created", [CREATED, CREATED + 0.001, CREATED + 0.999, CREATED + 1])
def test_text_and_json_stamps_are_rfc3339_utc_with_milliseconds(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    text = KeyValueFormatter().format(record(created))
    stamp = text.split(" ", 1)[0]
    doc = json.loads(JsonFormatter().format(record(created)))
    for got in (stamp, doc["ts"]):
        assert got == expected, (got, expected)
        parsed = datetime.fromisoformat(got)
        assert parsed.utcoffset() is not None
        assert abs(parsed.timestamp() - created) < 0.001


@pytest.mark.usefixtures("shanghai")
def test_the_example_stamp() -> None:
    text = KeyValueFormatter().format(record(CREATED))
    assert text.startswith("2026-12-06T09:40:52.370+00:00 info dwsproxy.session connection ")


def test_the_per_second_cache_keeps_the_fraction() -> None:
    formatter = KeyValueFormatter()
    first = formatter.format(record(CREATED)).split(" ", 1)[0]
    second = formatter.format(record(CREATED + 0.25)).split(" ", 1)[0]
    assert first.endswith(".370+00:00") and second.endswith(".620+00:00")
