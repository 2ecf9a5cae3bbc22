"""TLS objects built from a configuration, and certificate chains verified against it.

Owns: the client-facing and backend-facing SSLContexts (contexts), OpenSSL's chain and CRL
verification of client certificates (verify), the openGauss key-passphrase pair (gausskey),
what of them has expired or is near its end (expiry), and the loader that turns a config file
into a `Loaded` configuration: the frozen `Config` and the TLS objects built from the same
snapshot. Must not do socket I/O or decide policy.
"""
