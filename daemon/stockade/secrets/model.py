"""What every secret backend offers, and the errors they raise (messages never hold values)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_SECRET_BYTES = 64 * 1024


class SecretError(Exception):
    """A secret operation failed; the message is safe to show (it never holds a value)."""


class SecretNotFound(SecretError):
    pass


class SecretExists(SecretError):
    pass


class SecretBackendError(SecretError):
    """The backend (e.g. the Vault server) cannot be reached or refused the request."""


class SecretStoreLocked(SecretError):
    """The master key does not open the store (wrong key file or credential)."""


class SecretStoreDamaged(SecretError):
    """The store file is truncated or edited; it was not read."""


class SecretStoreRolledBack(SecretError):
    """The store is older than the generation the audit trail records; it was not used."""


@dataclass(frozen=True)
class SecretInfo:
    name: str
    backend: str
    created: str  # ISO 8601 UTC
    rotated: str  # ISO 8601 UTC; equal to `created` until the first rotation
    version: int
    line_ending_stripped: bool = False  # `set` removed a trailing CR/LF from the value


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise SecretError(f"{name!r} is not a secret name (letters, digits, _ . -; up to 63)")
    return name


def strip_line_ending(value: bytes) -> tuple[bytes, bool]:
    """`value` without its trailing CR/LF run, and whether there was one.

    `echo`, editors and Windows files end a value with one; stored, it would reach the
    server (a token with a newline in a header fails) and slip past redaction, since a
    server prints the token without it. A secret that truly ends in a newline cannot be
    stored; none we know of does.
    """
    stripped = value.rstrip(b"\r\n")
    return stripped, len(stripped) != len(value)


def check_value(value: bytes) -> bytes:
    if not value:
        raise SecretError("the secret is empty")
    if len(value) > MAX_SECRET_BYTES:
        raise SecretError(f"the secret is over {MAX_SECRET_BYTES} bytes")
    return value


class SecretStore(Protocol):
    backend: str

    def set(self, name: str, value: bytes, *, rotate: bool) -> SecretInfo:
        """Create (`rotate` False: must not exist) or rotate (must exist) a secret."""

    def get(self, name: str) -> bytes: ...

    def remove(self, name: str) -> None: ...

    def list(self) -> list[SecretInfo]: ...
