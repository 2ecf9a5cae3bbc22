"""The running proxy: the only layer that does network I/O.

Owns: listeners, limits and budgets (server, state), worker processes (workers), one client from
its first byte to its close (session), the byte pump and its TLS record layer (relay), and the
proxy as a client of the database (backend, backend_tls). Must not parse TOML, build TLS
contexts from files, or decide policy: it carries out the decisions of the layers below.
"""
