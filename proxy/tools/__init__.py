"""Commands beside the proxy: a small certificate authority (certs, its issuance record and
atomic writes in carecord, encrypted keys in keyfiles), the compliance probe (probe, with
conninfo: CONNINFO resolved by libpq, and pgclient: one libpq-like connection) and the demo
(demo).

Owns: those commands' logic. Must not be imported by the serving path (runtime, ops): the
proxy runs without them.
"""
