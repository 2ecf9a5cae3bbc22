"""Commands beside the proxy: a small certificate authority (certs, its issuance record and
atomic writes in carecord, encrypted keys in keyfiles), the compliance probe (probe, with
conninfo: CONNINFO resolved by libpq, pgclient: one libpq-like connection, and channel: its
socket, read strictly within a deadline) and the demo (demo).

Owns: those commands' logic. Must not be imported by the serving path (runtime, ops): the
proxy runs without them.
"""
