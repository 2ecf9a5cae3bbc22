"""dwsproxy: a TLS-terminating SSL policy proxy for the PostgreSQL wire protocol.

The package is layered; each folder imports only from the layers below it (checked by
tests/unit/test_layers.py), bottom to top:

    protocol/   sans-IO: bytes in, typed events and actions out
    config/     the configuration as data: read, parsed, validated, frozen
    tls/        TLS objects built from a configuration, certificate chains verified
    policy.py   pure decisions: Allow or Reject
    ops/        what operators see: metrics, admin views, systemd notifications
    runtime/    the running proxy, the only network I/O: listeners, sessions, relay, backends
    tools/      commands beside the proxy: certificates, the probe, the demo
    cli.py      argument parsing, exit codes, and wiring of the above
"""
