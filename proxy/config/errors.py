"""The configuration's one error, at the bottom of the package so every layer can name it.

Owns: `ConfigError`. Must not import anything of the proxy.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem; str() is one line that starts with the key path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
