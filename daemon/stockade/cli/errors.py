"""The CLI's one-line failure, kept free of heavy imports (the bridge raises it too)."""

from __future__ import annotations


class CliError(Exception):
    """A failure to report as one line, with the exit code to use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
