"""What operators see: metrics, the admin views, systemd's readiness protocol.

Owns: every metric (declared once), the HTTP listeners that serve metrics and views (httpd:
capped, Host-checked), the views' content and the admin plane's one action, built from a view
of a process's state that the runtime hands in. Must not import the runtime, touch client
sockets or decide policy.
"""
