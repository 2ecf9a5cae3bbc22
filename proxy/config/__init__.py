"""The configuration as data: the TOML file and the files it names, read once, parsed,
validated and frozen.

Owns: ConfigError (the lowest error every layer above may raise or catch), the schema of every
key (schema), the bytes of a configuration (snapshot), and the `[[ident]]` user name maps
with the one pure question they answer (ident). Must not build TLS objects, do
network I/O or import any other layer of the proxy.
"""
