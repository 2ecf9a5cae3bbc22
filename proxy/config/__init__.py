"""The configuration as data: the TOML file and the files it names, read once, parsed,
validated and frozen.

Owns: ConfigError (the lowest error every layer above may raise or catch), the schema of every
key (schema), and the bytes of a configuration (snapshot). Must not build TLS objects, do
network I/O or import any other layer of the proxy.
"""
