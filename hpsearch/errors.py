"""Errors that reach the user as one line."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config key holds a value that is not allowed.

    The message is a single line that names the key and what is allowed, so the command line can
    print it as it is before any heavy work starts.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")
