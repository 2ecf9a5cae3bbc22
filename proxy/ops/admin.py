"""The admin plane on its own `[admin]` listener: GET /sessions, /status and /, and the one
action, POST /sessions/{id}/terminate.

Owns: what each process reports about itself (its configuration's digests, its sessions),
gathering that from every worker through the main process (a worker that does not answer in
time is shown as such and never blocks the page), the small self-contained HTML status page,
and who may ask: the bearer token (`[admin] token_file`; always needed for an action), the Host
check and the security headers (httpd.py). Must not change anything but the one session an
operator names, never shows a key, a passphrase, a password or a backend's secret key, and
never imports the runtime: the server hands in a view of its state (`StateView`) and of its
workers (`WorkersView`), which its own classes satisfy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import httpd

if TYPE_CHECKING:
    from ..tls.loader import Loaded

WORKER_TIMEOUT = 1.0  # seconds a worker may take to answer a view
_TERMINATE = re.compile(r"/sessions/([^/]{1,64})/terminate")


class SessionView(Protocol):
    def view(self) -> dict[str, Any]: ...

    def terminate(self, reason: str, message: str) -> bool: ...


class StateView(Protocol):
    """What the views read of one process's state."""

    @property
    def loaded(self) -> Loaded: ...

    @property
    def sessions(self) -> Mapping[str, SessionView]: ...

    @property
    def last_reload(self) -> Mapping[str, object]: ...

    @property
    def loaded_at(self) -> str: ...

    def backends_view(self) -> list[dict[str, Any]]: ...


class WorkersView(Protocol):
    async def query(self, kind: str, timeout: float,
                    **extra: str) -> list[dict[str, Any]]: ...


def version() -> str:
    # importlib.metadata is ~0.8 MB of RSS a process: loaded when the version is asked for.
    from importlib import metadata

    try:
        return metadata.version("dwsproxy")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def process_status(state: StateView, kind: str) -> dict[str, Any]:
    """This process's part of a view: kind "status" or "sessions" (with the session list)."""
    snap = state.loaded.snapshot
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "config_sha256": snap.file_sha256,
        "snapshot_sha256": snap.sha256,
        "sessions": len(state.sessions),
    }
    if kind == "sessions":
        out["session_list"] = [s.view() for s in list(state.sessions.values())]
    return out


async def _all(state: StateView, workers: WorkersView | None,
               kind: str) -> list[dict[str, Any]]:
    mine = [process_status(state, kind)]
    return mine + (await workers.query(kind, WORKER_TIMEOUT) if workers is not None else [])


async def sessions_view(state: StateView, workers: WorkersView | None) -> dict[str, Any]:
    parts = await _all(state, workers, "sessions")
    listed = [s for p in parts for s in p.get("session_list", [])]
    listed.sort(key=lambda s: (s["started"], s["id"]))
    missing = [{"pid": p["pid"], "error": p["error"]} for p in parts if "error" in p]
    return {"sessions": listed, **({"unanswered_workers": missing} if missing else {})}


async def status_view(state: StateView, workers: WorkersView | None) -> dict[str, Any]:
    loaded = state.loaded
    cfg, snap = loaded.config, loaded.snapshot
    parts = await _all(state, workers, "status")
    in_force = snap.sha256
    procs = [{"pid": p["pid"], "config_sha256": p.get("config_sha256"),
              "sessions": p.get("sessions"), **({"error": p["error"]} if "error" in p else {})}
             for p in parts]
    certificates: list[dict[str, Any]] = []
    crls: list[dict[str, Any]] = []
    st, bt = loaded.server_tls, loaded.backend_tls
    if st is not None:
        certificates.append(_cert("server", st.server_cert))
        certificates += [_cert("ca", c) for c in st.ca_certs]
        crls = [{"issuer": c.issuer, "next_update": _time(c.next_update)} for c in st.crls]
    if bt is not None:
        certificates += [_cert("backend_ca", c) for c in bt.ca_certs]
        if bt.client_cert is not None:
            certificates.append(_cert("backend_client", bt.client_cert))
    return {
        "version": version(),
        "config": {"path": cfg.path, "sha256": snap.file_sha256,
                   "snapshot_sha256": in_force, "loaded_at": state.loaded_at},
        "reload": dict(state.last_reload),
        "workers": procs,
        "backends": state.backends_view(),
        "synchronized": all(p.get("snapshot_sha256") == in_force for p in parts),
        "policy": {"ssl": cfg.tls.ssl, "require_ssl": cfg.tls.require_ssl,
                   "clientcert": cfg.tls.clientcert, "rules": len(cfg.rules),
                   "backend_sslmode": cfg.backend.sslmode},
        "certificates": certificates,
        "crls": crls,
    }


def _time(when: float | None) -> str | None:
    import time

    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _cert(role: str, facts: Any) -> dict[str, Any]:
    return {"role": role, "subject": facts.subject, "not_after": _time(facts.not_after)}


def terminate_here(state: StateView, session_id: str) -> str:
    """End one of this process's sessions as a revoking reload does: "terminated", or why
    not ("unknown", "not_relaying")."""
    session = state.sessions.get(session_id)
    if session is None:
        return "unknown"
    ok = session.terminate("admin", "closed by an operator (POST /sessions/ID/terminate)")
    return "terminated" if ok else "not_relaying"


async def terminate(state: StateView, workers: WorkersView | None, session_id: str) -> str:
    """The session's process ends it: this one, or the worker whose pid the id starts with."""
    if session_id.split("-", 1)[0] == str(os.getpid()) or workers is None:
        return terminate_here(state, session_id)
    answers = await workers.query("terminate", WORKER_TIMEOUT, session=session_id)
    results = [a.get("terminate") for a in answers]
    for result in ("terminated", "not_relaying"):
        if result in results:
            return result
    return "unknown"


def _view_name(method: str, path: str) -> str:
    if path == "/":
        return "page"
    if path in ("/status", "/sessions"):
        return path[1:]
    if _TERMINATE.fullmatch(path):
        return "terminate"
    return "other"


def _json(status: int, doc: Any) -> httpd.Response:
    return httpd.Response(status, json.dumps(doc, indent=1).encode(), "application/json")


def handler(state: StateView, workers: Callable[[], WorkersView | None],
            count: Callable[[str, str], None]) -> httpd.Handler:
    """The [admin] listener's requests: who may ask (Host, token), then the view or action.
    `workers` gives the worker processes once they are started; `count(view, result)` is
    metrics.admin_request, handed in by the server: metrics imports this module (version()),
    and the CLI imports it before prometheus-client may be imported (PROMETHEUS_MULTIPROC_DIR)."""

    async def handle(request: httpd.Request) -> httpd.Response:
        view = _view_name(request.method, request.path)
        response = await _answer(request, view, state, workers())
        result = ("ok" if response.status < 400 else
                  "unauthorized" if response.status == 401 else "refused")
        count(view, result)
        return response

    return handle


async def _answer(request: httpd.Request, view: str, state: StateView,
                  workers: WorkersView | None) -> httpd.Response:
    if not httpd.host_allowed(request.headers.get("host"), request.local):
        # DNS rebinding: a page of another site, resolved to this address, reading the views
        return httpd.text(403, "Host not allowed: use the listener's address or localhost")
    token = state.loaded.admin_token
    action = view == "terminate"
    if token or action:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if not token:
            return httpd.Response(401, b"actions need a token: set [admin] token_file\n",
                                  headers=(("WWW-Authenticate", "Bearer"),))
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            return httpd.Response(401, b"a valid Authorization: Bearer token is required\n",
                                  headers=(("WWW-Authenticate", "Bearer"),))
    if action:
        if request.method != "POST":
            return httpd.text(405, "POST only")
        found = _TERMINATE.fullmatch(request.path)
        assert found is not None
        result = await terminate(state, workers, found.group(1))
        status = {"terminated": 202, "not_relaying": 409}.get(result, 404)
        return _json(status, {"id": found.group(1), "result": result})
    if request.method not in ("GET", "HEAD"):
        return httpd.text(405, "GET only")
    if view == "sessions":
        return _json(200, await sessions_view(state, workers))
    if view == "status":
        return _json(200, await status_view(state, workers))
    if view == "page":
        return httpd.Response(200, PAGE.encode(), "text/html; charset=utf-8",
                              headers=(("Content-Security-Policy", PAGE_CSP),))
    return httpd.text(404, "not found")


# The status page: no external assets, it renders /status and /sessions and refreshes itself.
# Every value is put into the page as text (textContent), never as HTML: user names,
# application names and certificate subjects come from clients.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dwsproxy status</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.plain{background:#ffe7e7}.ok{color:#176a1e}.bad{color:#b00020}
.muted{color:#777}
</style></head><body>
<h1>dwsproxy <span id="version" class="muted"></span></h1>
<p id="sync"></p>
<h2>Policy</h2><table id="policy"></table>
<h2>Certificates</h2><table id="certs"><tr><th>role</th><th>subject</th>
<th>not after</th><th>days left</th></tr></table>
<h2>Sessions <span id="count" class="muted"></span></h2>
<table id="sessions"><tr><th>peer</th><th>state</th><th>user</th><th>database</th>
<th>application</th><th>encryption</th><th>client certificate</th><th>backend TLS</th>
<th>backend pid</th><th>started</th><th>bytes in/out</th></tr></table>
<p class="muted">Plaintext sessions are marked. Refreshes every 5 s.</p>
<script>
"use strict";
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}
function clear(table) { while (table.rows.length > 1) table.deleteRow(1); }
async function refresh() {
  try {
    const [status, sessions] = await Promise.all([
      fetch("/status").then(r => r.json()), fetch("/sessions").then(r => r.json())]);
    document.getElementById("version").textContent = status.version;
    const sync = document.getElementById("sync");
    sync.textContent = (status.synchronized ? "synchronized" : "NOT synchronized") +
      ": configuration " + status.config.sha256.slice(0, 12) + " in " +
      status.workers.length + " process(es)" +
      (status.reload.result ? "; last reload: " + status.reload.result : "");
    sync.className = status.synchronized ? "ok" : "bad";
    const policy = document.getElementById("policy");
    policy.textContent = "";
    for (const [k, v] of Object.entries(status.policy)) {
      const row = policy.insertRow(); cell(row, k); cell(row, v);
    }
    const certs = document.getElementById("certs"); clear(certs);
    for (const c of status.certificates) {
      const row = certs.insertRow();
      const days = Math.floor((Date.parse(c.not_after) - Date.now()) / 86400000);
      cell(row, c.role); cell(row, c.subject); cell(row, c.not_after);
      cell(row, days, days < 14 ? "bad" : "");
    }
    const table = document.getElementById("sessions"); clear(table);
    document.getElementById("count").textContent = "(" + sessions.sessions.length + ")";
    for (const s of sessions.sessions) {
      const row = table.insertRow();
      if (s.encryption === "plain") row.className = "plain";
      cell(row, s.peer); cell(row, s.state); cell(row, s.user); cell(row, s.database);
      cell(row, s.application_name); cell(row, s.encryption === "tls" ? s.tls : "plaintext");
      cell(row, s.client_cert ? s.client_cert.subject : ""); cell(row, s.backend_tls);
      cell(row, s.backend_pid); cell(row, s.started); cell(row, s.bytes_in + " / " + s.bytes_out);
    }
  } catch (err) {
    document.getElementById("sync").textContent = "cannot read the views: " + err;
  }
}
refresh();
setInterval(refresh, 5000);
</script></body></html>
"""


def _inline_hash(tag: str) -> str:
    body = PAGE.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


# The page's own script and style by hash, fetches to this origin only, and never in a frame.
PAGE_CSP = (f"default-src 'none'; script-src {_inline_hash('script')}; "
            f"style-src {_inline_hash('style')}; connect-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'")
