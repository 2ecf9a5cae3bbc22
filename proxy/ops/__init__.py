"""What operators see: metrics, the admin views, systemd's readiness protocol.

Owns: every metric (declared once), the HTTP endpoints that serve metrics and views, and the
views' content, built from a read-only view of a process's state that the runtime hands in.
Must not import the runtime, touch client sockets or decide policy.
"""
