"""Command line: argument parsing, logging set-up, exit codes.

Owns: `dwsproxy --config FILE`, `--version`, `check-config`, `reload`, `certs …`, `probe` and
`demo`; choosing uvloop; setting PROMETHEUS_MULTIPROC_DIR before prometheus-client is imported.
One exit-status convention for every subcommand (README "Exit status"): 0 ok, 1 a check found a
difference (`probe --expect`, a demo cell unlike Table 3), 2 an error (a config or usage error,
cannot listen, cannot reach the proxy, a refused reload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import schema as config_mod
from .config.errors import ConfigError
from .ops import admin

if TYPE_CHECKING:
    from .tls.loader import Loaded

log = logging.getLogger("dwsproxy")

EXIT_OK, EXIT_DIFFERENCE, EXIT_ERROR = 0, 1, 2


class _Rfc3339:
    """Log timestamps as RFC 3339 in UTC with milliseconds, `2026-12-06T09:40:52.370+00:00`:
    a collector (Loki, ELK) reads the zone from the line instead of guessing it, so a host on
    CST (+08:00, the usual zone of GaussDB(DWS) users) is not 8 hours off, and the logs agree
    with /status, which prints UTC. The part up to the second is formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, created: float) -> str:
        # Rounded to the microsecond first (as datetime does), then cut to the millisecond:
        # 52.370 is the float 52.36999..., and must not print as .369.
        second, micros = divmod(round(created * 1_000_000), 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{micros // 1000:03d}+00:00"


class KeyValueFormatter(logging.Formatter):
    """key=value lines. A connection's line has ~16 fields and there is one per connection:
    fields are written in one loop without a call per field for the common types."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Rfc3339()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._stamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        parts = [self.formatTime(record), record.levelname.lower(), record.name,
                 record.getMessage()]
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            search = _NEEDS_QUOTES.search
            for k, v in fields.items():
                kind = v.__class__
                if kind is str:
                    if len(v) > MAX_FIELD:
                        v = _cut(v)
                    if v == "" or search(v):
                        v = json.dumps(v)
                elif kind is not int and kind is not bool:
                    v = _kv(v)
                parts.append(f"{k}={v}")
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


# Anything a client could use to forge or garble a log line: spaces, quotes, '=', and every
# character outside printable ASCII (CR, escapes; non-ASCII is JSON-escaped too).
_NEEDS_QUOTES = re.compile(r'[^\x21\x23-\x3c\x3e-\x7e]')


# Values in log lines come from clients (user, database, application_name, certificate
# subjects): one connection must not be able to write a 10 kB line.
MAX_FIELD = 256


def _cut(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return f"{value[:MAX_FIELD]}...({len(value) - MAX_FIELD} more)"
    return value


def _kv(value: object) -> str:
    if isinstance(value, (int, float)):  # bool included: numbers never need quotes
        return str(value)
    text = str(_cut(value))
    if text == "" or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Rfc3339()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self._stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: _cut(v) for k, v in getattr(record, "fields", {}).items()})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    # Neither format prints the thread, process or source line: skip gathering them for every
    # record (the logging HOWTO's "Optimization"; one line per connection adds up under churn).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _run(coro_factory: Any) -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(coro_factory()))


def _load_or_exit(path: str, *, warn: bool = True) -> Loaded:
    from .tls import loader

    try:
        return loader.load(path, warn=warn)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _config_from_main() -> tuple[Loaded, Any]:
    """A worker's configuration: the snapshot the main process validated, over the control
    channel it passed; the file named by --config is never read here."""
    from .runtime import workers
    from .tls import loader

    control = workers.control_socket()
    message = workers.read_message_blocking(control) if control is not None else None
    if control is None or message is None:
        print("dwsproxy: a worker needs its main process's control channel", file=sys.stderr)
        raise SystemExit(2)
    try:
        return loader.build(workers.snapshot_of(message)), control
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    control = None
    if args.worker:
        loaded, control = _config_from_main()
    else:
        loaded = _load_or_exit(args.config)
    cfg = loaded.config
    multiproc_dir = None
    if cfg.listen.workers > 1 and not args.worker:
        multiproc_dir = tempfile.mkdtemp(prefix="dwsproxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    from .runtime import server  # imports prometheus_client: only after the env var is set

    if args.pid_file and not args.worker:
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    try:
        worker_argv = ["--config", cfg.path, "--log-level", args.log_level,
                       "--log-format", args.log_format]
        status = _run(lambda: server.serve(loaded, worker=args.worker,
                                           worker_argv=worker_argv, control=control))
        return EXIT_ERROR if status else EXIT_OK  # cannot listen, workers did not stop
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
        if args.pid_file and not args.worker:
            Path(args.pid_file).unlink(missing_ok=True)


def _view_target(args: argparse.Namespace) -> tuple[str, str]:
    """The [admin] listener's URL and its token: from --url/--token-file, else from the
    config file's [admin] table, else the default 127.0.0.1:9188 without a token. The URL is
    "" when that config says `[admin] enabled = false`."""
    host, port, token_file = "127.0.0.1", 9188, ""
    if args.view_config:
        try:
            cfg = config_mod.parse(_read_or_exit(args.view_config), args.view_config)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if not cfg.admin.enabled:
            return "", ""  # no admin listener: nothing to read
        host, port, token_file = cfg.admin.host, cfg.admin.port, cfg.admin.token_file
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
    url = (str(args.url).rstrip("/") if args.url
           else f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    token_file = args.token_file or token_file
    token = ""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            print(f"dwsproxy {args.command}: cannot read the token file {token_file}: "
                  f"{exc.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
    return url, token


def _admin_request(args: argparse.Namespace, path: str,
                   method: str = "GET") -> tuple[int, Any] | None:
    """(HTTP status, JSON document) of an admin request; None (after a message) when the
    listener cannot be reached."""
    import urllib.error
    import urllib.request

    base, token = _view_target(args)
    if not base:
        print(f"dwsproxy {args.command}: [admin] enabled = false in {args.view_config}: no "
              "listener to ask", file=sys.stderr)
        return None
    url = f"{base}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"error": body.decode(errors="replace").strip()}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"dwsproxy {args.command}: cannot read {url}: {reason}", file=sys.stderr)
        return None


def _read_or_exit(path: str) -> str:
    from .config import snapshot

    try:
        return snapshot.read_text(path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_view(args: argparse.Namespace) -> int:
    """`dwsproxy sessions` / `dwsproxy status`: read the admin view and print it."""
    answer = _admin_request(args, f"/{args.command}")
    if answer is None:
        return 2
    status, doc = answer
    if status != 200:
        print(f"dwsproxy {args.command}: HTTP {status}: {escape(str(doc.get('error', doc)))}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=1))
    elif args.command == "sessions":
        print(_session_table(doc["sessions"]))
    else:
        print(_status_report(doc))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    """`dwsproxy kill ID`: POST /sessions/ID/terminate (a token is always needed)."""
    answer = _admin_request(args, f"/sessions/{urllib_quote(args.id)}/terminate", "POST")
    if answer is None:
        return 2
    status, _ = answer
    if status == 202:
        print(f"dwsproxy kill: session {escape(args.id)} terminated (57P01 to the client, its "
              "running query cancelled)")
        return 0
    why = {404: "no such session", 409: "the session is not relaying (yet)",
           401: "unauthorized: give the [admin] token (--config or --token-file)",
           403: "refused by the listener's Host check"}.get(status, f"HTTP {status}")
    print(f"dwsproxy kill: {escape(args.id)}: {why}", file=sys.stderr)
    return 1


def urllib_quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


_CONTROL = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def escape(text: str) -> str:
    """Text a client chose (application_name, user, certificate subjects), safe for a
    terminal: control characters (ESC and the rest of C0, DEL, C1) and backslashes written
    as escapes, so no escape sequence reaches the operator's terminal."""
    return text.replace("\\", "\\\\").translate(_CONTROL)


def _session_table(sessions: list[dict[str, Any]]) -> str:
    head = ("ID", "WORKER", "PEER", "STATE", "USER", "DATABASE", "APPLICATION", "TLS",
            "CLIENT_CERT", "BACKEND_TLS", "BACKEND", "BACKEND_PID", "BACKEND_PORT", "STARTED",
            "IN", "OUT")
    rows = [head] + [tuple(escape(str(v)) for v in (
        s["id"], s["worker"], s["peer"], s["state"], s["user"] or "", s["database"] or "",
        s["application_name"] or "", s["tls"] or "plaintext",
        (s["client_cert"] or {}).get("subject", ""), s["backend_tls"],
        s.get("backend") or "", s.get("backend_pid") or "", s.get("backend_local_port") or "",
        s["started"], s["bytes_in"], s["bytes_out"])) for s in sessions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    return "\n".join([*lines, f"({len(sessions)} sessions)"])


def _status_report(doc: dict[str, Any]) -> str:
    cfg, reload = doc["config"], doc["reload"]
    lines = [f"dwsproxy {doc['version']}",
             f"configuration: {cfg['path']} sha256 {cfg['sha256']} (loaded {cfg['loaded_at']})",
             f"synchronized:  {'yes' if doc['synchronized'] else 'NO'} "
             f"({len(doc['workers'])} processes)"]
    if reload["result"]:
        lines.append(f"last reload:   {reload['result']} at {reload['at']}"
                     + (f": {reload['error']}" if reload["error"] else ""))
    for w in doc["workers"]:
        lines.append(f"  pid {w['pid']}: " + (w["error"] if "error" in w else
                     f"sha256 {w['config_sha256'][:12]}, {w['sessions']} sessions"))
    lines.append("policy:        " + ", ".join(f"{k}={v}" for k, v in doc["policy"].items()))
    for c in doc["certificates"]:
        lines.append(f"certificate:   {c['role']:<14} {c['subject']}  not after {c['not_after']}")
    for c in doc["crls"]:
        lines.append(f"crl:           {c['issuer']}  next update {c['next_update']}")
    # certificate subjects and issuers come from files others made; the error from a reload
    return "\n".join(escape(line) for line in lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 2 for a config error, an expired server certificate or CRL; warnings (a
    certificate or CRL near its end) are printed with exit 0."""
    import time

    from .tls import loader

    loaded = _load_or_exit(args.file, warn=False)
    cfg = loaded.config
    found = loader.expiry_findings(loaded, time.time())
    for f in found:
        label = "config error" if f.level == "error" else "warning"
        print(f"{label}: {f.key}: {f.message}", file=sys.stderr)
    for text in config_mod.warnings(cfg):
        print(f"warning: {text}", file=sys.stderr)
    if any(f.level == "error" for f in found):
        return 2
    print(f"config ok: {cfg.path}")
    return 0


def _get_json(url: str, token: str = "") -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def _config_of_pid(pid_file: str) -> str:
    """The --config FILE a running proxy was started with (Linux /proc), absolute; "" when it
    cannot be read (the caller then says what it could not do)."""
    try:
        pid = int(Path(pid_file).read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
        value = argv[argv.index(b"--config") + 1].decode()
    except (OSError, ValueError, IndexError):
        return ""
    return os.path.join(cwd, value)


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP, then wait for that reload's result in /status: 0 applied, 2 refused (with the
    refused key's line) or unknown."""
    import urllib.error

    if args.pid_file and not args.url and not args.view_config:
        # The proxy's own --config, from its command line: where its /status is.
        args.view_config = _config_of_pid(args.pid_file)
    base, token = _view_target(args)  # the [admin] listener, where /status is
    url = f"{base}/status"
    try:
        if not base:
            raise OSError("[admin] enabled = false")
        before = _get_json(url, token)
        status_error = ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        before, status_error = {}, str(getattr(exc, "reason", exc))
    try:
        if args.pid_file:
            pid = int(Path(args.pid_file).read_text().strip())
        elif before:
            pid = int(before["workers"][0]["pid"])  # the main process answers first
        else:
            print(f"reload: cannot read {url}: {status_error}; give --pid-file",
                  file=sys.stderr)
            return 2
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        where = args.pid_file or url
        print(f"reload: cannot signal the process in {where}: {exc}", file=sys.stderr)
        return 2
    if not before:
        print(f"reload: sent SIGHUP to {pid}, but its result cannot be read at {url}: "
              f"{status_error}", file=sys.stderr)
        return 2
    seq = int(before.get("reload", {}).get("seq") or 0)
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            reload = _get_json(url, token).get("reload", {})
        except (urllib.error.URLError, OSError, ValueError):
            reload = {}
        # The first reload after ours that SIGHUP made (the file watcher may reload too).
        if int(reload.get("seq") or 0) > seq and reload.get("trigger") == "SIGHUP":
            break
        if int(reload.get("seq") or 0) > seq:
            seq = int(reload["seq"])
        if time.monotonic() > deadline:
            print(f"reload: sent SIGHUP to {pid}; no result in {url} after {args.timeout:g}s",
                  file=sys.stderr)
            return 2
        time.sleep(0.1)
    if reload.get("result") != "success":
        print(f"reload refused, the previous configuration stays in force: config error: "
              f"{reload.get('error')}", file=sys.stderr)
        return 2
    print(f"reload: applied by {pid} at {reload.get('at')}")
    return 0


def _add_certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="make a CA, server/client certificates and a CRL")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    force = "replace existing files (refused without it)"
    p_init = csub.add_parser("init", help="CA, server and client certs, empty CRL in DIR")
    p_init.add_argument("dir")
    p_init.add_argument("--server-cn", default="localhost")
    p_init.add_argument("--client-cn", default="postgres")
    p_init.add_argument("--days", type=int, default=825)
    p_init.add_argument("--force", action="store_true", help=force + ": a new CA")
    p_client = csub.add_parser("client", help="another client certificate from DIR's CA")
    p_client.add_argument("dir")
    p_client.add_argument("--cn", required=True)
    p_client.add_argument("--days", type=int, default=825)
    p_client.add_argument("--force", action="store_true", help=force)
    p_enc = csub.add_parser("encrypt-key", help="encrypt KEY in place, its passphrase in an "
                            "openGauss <stem>.key.cipher + <stem>.key.rand pair beside it")
    p_enc.add_argument("key")
    p_enc.add_argument("--stem", default="client", choices=["client", "server"],
                       help="server: as openGauss finds it beside ssl_key_file; client: as "
                            "gsql finds it beside sslcert (default)")
    p_enc.add_argument("--force", action="store_true", help="replace an existing pair")
    p_show = csub.add_parser("show-passphrase", help="print the passphrase a .cipher/.rand "
                             "pair holds, to a terminal only (for psql's sslpassword)")
    p_show.add_argument("pair", help="the .cipher or .rand file, or their common prefix "
                        "(sslcert/client.key)")
    p_bundle = csub.add_parser("bundle", help="a client bundle as the DWS console hands it out: "
                               "sslcert/client.crt, client.key, cacert.pem, client.key.pk8")
    p_bundle.add_argument("dir", help="the CA's directory (cacert.pem, cakey.pem)")
    p_bundle.add_argument("--cn", required=True)
    p_bundle.add_argument("--out", required=True, help="the .zip to write")
    p_bundle.add_argument("--days", type=int, default=825)
    p_bundle.add_argument("--encrypt", action="store_true", help="encrypt the key, its "
                          "passphrase in a client.key.cipher + client.key.rand pair")
    p_bundle.add_argument("--force", action="store_true", help="replace an existing --out")
    p_revoke = csub.add_parser("revoke", help="add a certificate to DIR/crl.pem and re-sign it")
    p_revoke.add_argument("dir")
    p_revoke.add_argument("cert", nargs="?", help="the certificate file (PEM or DER)")
    p_revoke.add_argument("--serial", help="or its serial number in hex (certs list)")
    p_revoke.add_argument("--force", action="store_true", help="also the CA's or the proxy's "
                          "server certificate")
    p_crl = csub.add_parser("crl", help="re-sign DIR/crl.pem with a new nextUpdate, every "
                            "revoked serial kept")
    p_crl.add_argument("dir")
    p_crl.add_argument("--days", type=int, default=None, help="valid for N days (default: "
                       "until the CA certificate expires)")
    p_list = csub.add_parser("list", help="what DIR's CA issued, revoked, and its CRL's end")
    p_list.add_argument("dir")


class _VersionAction(argparse.Action):
    """`--version`, the version looked up only when asked for (admin.version)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"dwsproxy {admin.version()}")  # to stdout, as argparse's own version action
        parser.exit()


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="", help="the [admin] listener, e.g. "
                        "http://127.0.0.1:9188 (default: from --config, else that)")
    parser.add_argument("--config", dest="view_config", default="",
                        help="read [admin] host, port and token_file from this config file")
    parser.add_argument("--token-file", default="", help="the bearer token ([admin] "
                        "token_file); overrides the config's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwsproxy",
        description="TLS-terminating SSL policy proxy for the PostgreSQL wire protocol")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--config", help="TOML configuration file (runs the proxy)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--pid-file", default="", help="write the process id here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file")
    reload = sub.add_parser("reload", help="ask a running proxy to reload (SIGHUP) and wait "
                            "for the result: exit 0 applied, 2 refused")
    reload.add_argument("--pid-file", dest="pid_file", default="",
                        help="the proxy's --pid-file (default: the pid /status gives); "
                        "/status is then found from that process's --config")
    reload.add_argument("--config", dest="view_config", default="",
                        help="read the [admin] listener of /status (and its token) from this "
                        "config file")
    reload.add_argument("--url", default="", help="the [admin] listener of /status, e.g. "
                        "http://127.0.0.1:9188 (default: from --config, else that)")
    reload.add_argument("--token-file", default="", help="the bearer token ([admin] "
                        "token_file); overrides the config's")
    reload.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the result (default 60)")

    for name, what in (("sessions", "list the open client connections (every worker)"),
                       ("status", "the configuration in force, workers, policy, certificates")):
        view = sub.add_parser(name, help=what)
        _admin_arguments(view)
        view.add_argument("--json", action="store_true", help="print the JSON view as is")
    kill = sub.add_parser("kill", help="end one session (57P01 to the client, its running "
                          "query cancelled): POST /sessions/ID/terminate")
    kill.add_argument("id", help="the session's id, as `dwsproxy sessions` lists it")
    _admin_arguments(kill)
    _add_certs_parser(sub)
    probe = sub.add_parser("probe", help="what a libpq client gets from a server with each "
                           "sslmode, and the server's TLS facts")
    probe.add_argument("conninfo", nargs="?", default="",
                       help="libpq connection string or URI (PG* variables fill the rest)")
    probe.add_argument("--json", action="store_true", help="one JSON object")
    probe.add_argument("--expect", action="append", metavar="KEY=VALUE",
                       help="exit 1 unless ssl, require_ssl, client_cert or min_tls is VALUE; "
                       "makes only the connections these keys need")
    probe.add_argument("--full", action="store_true",
                       help="with --expect: still probe every TLS fact (suite enumeration)")
    probe.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="deadline for the whole probe (default 60)")
    demo = sub.add_parser("demo", help="throwaway PostgreSQL + proxy + a live Table 3")
    demo.add_argument("--dir", default="demo", help="work directory (default ./demo)")
    demo.add_argument("--no-wait", action="store_true",
                      help="print Table 3 and exit instead of serving until Ctrl-C")
    demo.add_argument("--port", type=int, default=6432, help="the proxy left up (default 6432)")
    demo.add_argument("--metrics-port", type=int, default=9187,
                      help="its metrics listener (default 9187)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "reload":
        return cmd_reload(args)
    if args.command in ("sessions", "status"):
        return cmd_view(args)
    if args.command == "kill":
        return cmd_kill(args)
    if args.command == "certs":
        from .tools import certs

        return certs.main(args)
    if args.command == "probe":
        from .tools import probe

        return probe.main(args)
    if args.command == "demo":
        from .tools import demo

        return demo.main(args)
    if not args.config:
        parser.print_usage(sys.stderr)
        print("dwsproxy: error: --config FILE is required", file=sys.stderr)
        return 2
    return cmd_serve(args)


if __name__ == "__main__":
    sys.exit(main())
