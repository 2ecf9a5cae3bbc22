"""psycopg on the distribution's libpq 15 (PSYCOPG_IMPL=python), sync and async, through the
proxy with sslmode=require: results from 1 KB to 500 KB never hang.

The defect: libpq <= 17 in non-blocking mode reads into the space left in its input buffer
(16 KB at first, and pqReadData makes sure of at least 8 KB). From a 16 KB TLS record OpenSSL
returns what fits and keeps the rest; libpq does not drain that before the application waits on
the socket again (libpq 18 does). If the rest holds the end of the reply and nothing more is on
the wire, the client waits forever. PostgreSQL never sends a record larger than its 8 KB send
buffer, so it never happens directly; the proxy must not send larger records either.

How often it bites depends on timing: the proxy makes a record of what one read from the
backend returned, so it sends 16 KB records when it reads slower than PostgreSQL writes (a busy
or descheduled proxy). Two tests, therefore:
- `test_libpq15_*_direct_backend`: the plain set-up, about a hundred result shapes from 1 KB to
  500 KB, on one connection, each query under a timeout;
- `test_libpq15_*_bursty_backend`: the same client with PostgreSQL behind a forwarder that
  hands the proxy each reply in one burst (as a network, or a proxy that was not scheduled for
  a millisecond, does), with replies just under multiples of 16 KB and a new connection per
  query. On code that sends 16 KB records a fifth or more of these queries hang, every run.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy, clean_env

from proxy.tools.demo import TempPostgres

CLIENT = Path(__file__).resolve().parent / "libpq15_client.py"
QUERY_TIMEOUT = 5.0  # a query takes milliseconds; a hang is forever


def direct_shapes() -> list[tuple[int, int]]:
    """(row width, row count): replies from 1 KB to 500 KB as one wide row, as rows of a few
    hundred bytes, and as rows near libpq's 8 KB read size."""
    out: list[tuple[int, int]] = []
    totals = [1_000, 3_000, 7_000, 9_000, 12_000, 15_500, 17_000, 23_000, 31_000, 40_000,
              47_000, 63_000, 70_000, 95_000, 130_000, 170_000, 260_000, 380_000, 500_000]
    for total in totals:
        for width in (total, 8_150, 4_093, 1_499, 997, 301):
            shape = (width, max(1, total // width))
            if width <= total and shape not in out:
                out.append(shape)
    return out


def bursty_shapes() -> list[tuple[int, int]]:
    """Replies just under k × 16 KB (k = 2..7): in a burst their last record is nearly a full
    16 KB one, more than libpq's free buffer space whenever a row is left half-read."""
    out: list[tuple[int, int]] = []
    for width in (518, 997, 1485, 2922, 4740, 6221, 8230, 8651):
        row = width + 11  # DataRow: type, length, column count, column length
        for k in range(2, 8):
            rows = (k * 16384 - 100) // row
            out += [(width, rows), (width, rows - 1)]
    return out


class BurstyForwarder:
    """A TCP forwarder between the proxy and PostgreSQL: the proxy's bytes go on at once;
    PostgreSQL's are held until a ReadyForQuery completes (or the server closes) and then sent
    in one send(), so the proxy's read returns a whole reply."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bursts = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [down, up]
            threading.Thread(target=self._pass_on, args=(down, up), daemon=True).start()
            threading.Thread(target=self._in_bursts, args=(up, down), daemon=True).start()

    @staticmethod
    def _pass_on(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _in_bursts(self, src: socket.socket, dst: socket.socket) -> None:
        held = bytearray()
        parsed = 0  # start of the first message not yet seen whole
        try:
            while data := src.recv(65536):
                held += data
                end = 0
                while parsed + 5 <= len(held):
                    (length,) = struct.unpack_from("!i", held, parsed + 1)
                    if parsed + 1 + length > len(held):
                        break
                    if held[parsed] == ord("Z"):
                        end = parsed + 1 + length
                    parsed += 1 + length
                if end:
                    dst.sendall(held[:end])
                    self.bursts += 1
                    del held[:end]
                    parsed -= end
            dst.sendall(held)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._socks:
            sock.close()


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy(tls={"require_ssl": True})


@pytest.fixture(scope="module")
def bursty_proxy(start_proxy: Callable[..., Proxy],
                 pg: TempPostgres) -> Iterator[tuple[Proxy, BurstyForwarder]]:
    forwarder = BurstyForwarder(pg.port)
    yield start_proxy(tls={"require_ssl": True}, pg_port=forwarder.port), forwarder
    forwarder.close()


def run_client(port: int, pki: Path, mode: str, shapes: list[tuple[int, int]],
               fresh: bool) -> list[dict[str, Any]]:
    conninfo = (f"host=localhost port={port} user=postgres dbname=postgres sslmode=require "
                f"sslrootcert={pki / 'cacert.pem'}")
    out = subprocess.run(
        [sys.executable, str(CLIENT), conninfo, str(QUERY_TIMEOUT), mode, "1" if fresh else "0",
         json.dumps(shapes)],
        env=clean_env(PSYCOPG_IMPL="python"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    # the point of these tests is libpq 15 in psycopg's python implementation: nothing else
    assert report["impl"] == "python", report["impl"]
    assert report["libpq"] // 10000 == 15, report["libpq"]
    records: list[dict[str, Any]] = report["records"]
    assert len(records) == len(shapes)
    return records


def assert_no_hang(records: list[dict[str, Any]]) -> None:
    hangs = [(r["width"], r["rows"]) for r in records if r["hang"]]
    errors = [r for r in records if not r["hang"] and r["error"]]
    assert not hangs, f"{len(hangs)} of {len(records)} queries hung: {hangs}"
    assert not errors, errors


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_libpq15_never_hangs_direct_backend(proxy: Proxy, pki: Path, mode: str) -> None:
    shapes = direct_shapes()
    assert len(shapes) > 90
    assert_no_hang(run_client(proxy.port, pki, mode, shapes, fresh=False))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_libpq15_never_hangs_bursty_backend(
        bursty_proxy: tuple[Proxy, BurstyForwarder], pki: Path, mode: str) -> None:
    proxy, forwarder = bursty_proxy
    shapes = bursty_shapes()
    before = forwarder.bursts
    records = run_client(proxy.port, pki, mode, shapes, fresh=True)
    # every reply (and every start-up) really went to the proxy as one burst
    assert forwarder.bursts - before >= 2 * len(shapes)
    assert_no_hang(records)
