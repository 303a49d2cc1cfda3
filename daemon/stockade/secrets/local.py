"""The local encrypted secret store (the default): one file in the state dir.

- Keys: scrypt (n=2^15, r=8, p=1, a random salt per store) stretches the master key into
  an AES-256 key and an HMAC key.
- Each secret: AES-256-GCM with a fresh 96-bit nonce; its name, version and times are the
  associated data, so a value cannot be moved to another name or its metadata altered.
- The whole file: an HMAC over everything else, so removing or adding an entry, or editing
  one, is detected. A verifier entry tells a wrong master key from a damaged file.
- Rollback: the HMAC cannot tell an older whole copy from the current one. So the store has
  a `generation`, raised by every change (set, rotate, rm) and recorded in the signed audit
  trail (`secrets/generation.py`); a store older than the last audited generation is refused
  at load (`SecretStoreRolledBack`), so a restored copy cannot bring back a rotated or
  removed secret.
- Writes are atomic (temp file, fsync, rename, fsync the folder): a crash leaves the old
  store or the new one. A truncated or edited file is refused whole, never half-read.

The master key comes from `$CREDENTIALS_DIRECTORY/stockade-master-key` (a systemd
credential) when set, else from a 0600 key file (created on first use).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from stockade.atomic import write_atomically
from stockade.secrets.model import (
    SecretError,
    SecretExists,
    SecretInfo,
    SecretNotFound,
    SecretStoreDamaged,
    SecretStoreLocked,
    SecretStoreRolledBack,
    check_name,
    check_value,
    strip_line_ending,
)

CREDENTIAL_NAME = "stockade-master-key"
FORMAT_VERSION = 1
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
VERIFIER = b"stockade secret store verifier"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def load_master_key(key_file: Path) -> bytes:
    """The master key: the systemd credential if present, else the key file (made if absent)."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
        key = (Path(credentials) / CREDENTIAL_NAME).read_bytes().strip()
        if len(key) < 32:
            raise SecretStoreLocked("the systemd credential stockade-master-key is under 32 bytes")
        return key
    if not key_file.exists():
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    mode = key_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretStoreLocked(
            f"{key_file} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    key = key_file.read_bytes().strip()
    if len(key) < 32:
        raise SecretStoreLocked(f"{key_file} holds under 32 bytes: not a master key")
    return key


def master_key_id(key: bytes) -> str:
    """A public id of the master key (HMAC of a constant): pinnable, reveals nothing of it."""
    return hmac.new(key, b"stockade master key id v1", hashlib.sha256).hexdigest()


class LocalSecretStore:
    backend = "local"

    def __init__(self, path: Path, master_key: bytes, *, audited_generation: int = 0) -> None:
        self._path = path
        self._document = self._read() if path.exists() else self._new_document()
        self._aead, self._mac_key = self._keys(master_key)
        if path.exists():
            self._check(self._document)
        if self.generation < audited_generation:
            what = "is at generation" if path.exists() else "is missing: a new one would be"
            raise SecretStoreRolledBack(
                f"{path} {what} {self.generation} but the audit trail records generation "
                f"{audited_generation}: an older copy was restored (it would bring back "
                "rotated or removed secrets); refusing it"
            )
        if not path.exists():
            self._document["verifier"] = self._seal(VERIFIER, b"verifier")
            self._save()

    @property
    def generation(self) -> int:
        """How many changes this store has seen (0 for a new store, or one made before)."""
        return int(self._document.get("generation", 0))

    # -- the file ------------------------------------------------------------------------

    @staticmethod
    def _new_document() -> dict[str, Any]:
        kdf = {"name": "scrypt", "salt": _b64(secrets.token_bytes(16)), **SCRYPT}
        return {"version": FORMAT_VERSION, "kdf": kdf, "secrets": {}}

    def _read(self) -> dict[str, Any]:
        try:
            document = json.loads(self._path.read_bytes())
            if document.get("version") != FORMAT_VERSION or "mac" not in document:
                raise ValueError("unknown format")
        except (OSError, ValueError, AttributeError) as exc:
            raise SecretStoreDamaged(
                f"{self._path} is damaged or truncated ({exc.__class__.__name__}); it was not "
                "read. Restore it from a backup"
            ) from None
        return dict(document)

    def _keys(self, master_key: bytes) -> tuple[AESGCM, bytes]:
        kdf = self._document["kdf"]
        material = Scrypt(
            salt=_unb64(kdf["salt"]), length=64, n=kdf["n"], r=kdf["r"], p=kdf["p"]
        ).derive(master_key)
        return AESGCM(material[:32]), material[32:]

    def _mac(self, document: dict[str, Any]) -> str:
        body = {k: v for k, v in document.items() if k != "mac"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return _b64(hmac.new(self._mac_key, text, hashlib.sha256).digest())

    def _check(self, document: dict[str, Any]) -> None:
        try:
            self._open(document["verifier"], b"verifier")
        except (InvalidTag, KeyError, ValueError):
            raise SecretStoreLocked(
                f"the master key does not open {self._path}: wrong key file or credential "
                "(the store is unchanged)"
            ) from None
        if not hmac.compare_digest(self._mac(document), str(document["mac"])):
            raise SecretStoreDamaged(
                f"{self._path} was altered (its integrity check fails); it was not used. "
                "Restore it from a backup"
            )

    def _save(self) -> None:
        self._document["mac"] = self._mac(self._document)
        write_atomically(self._path, json.dumps(self._document, indent=1, sort_keys=True).encode())

    # -- sealing -------------------------------------------------------------------------

    def _seal(self, value: bytes, associated: bytes) -> dict[str, str]:
        nonce = secrets.token_bytes(12)
        return {
            "nonce": _b64(nonce),
            "ciphertext": _b64(self._aead.encrypt(nonce, value, associated)),
        }

    def _open(self, sealed: dict[str, str], associated: bytes) -> bytes:
        return self._aead.decrypt(_unb64(sealed["nonce"]), _unb64(sealed["ciphertext"]), associated)

    @staticmethod
    def _associated(name: str, entry: dict[str, Any]) -> bytes:
        return f"secret:{name}:{entry['version']}:{entry['created']}:{entry['rotated']}".encode()

    # -- the store interface -----------------------------------------------------------

    def set(self, name: str, value: bytes, *, rotate: bool) -> SecretInfo:
        check_name(name)
        value, stripped = strip_line_ending(value)
        check_value(value)
        entries: dict[str, Any] = self._document["secrets"]
        old = entries.get(name)
        if rotate and old is None:
            raise SecretNotFound(f"no secret named {name!r} to rotate (use `secret set`)")
        if not rotate and old is not None:
            raise SecretExists(f"secret {name!r} exists; use `stockade secret rotate {name}`")
        now = _now()
        entry = {
            "created": old["created"] if old else now,
            "rotated": now,
            "version": old["version"] + 1 if old else 1,
        }
        entry |= self._seal(value, self._associated(name, entry))
        entries[name] = entry
        self._document["generation"] = self.generation + 1
        self._save()
        return replace(self._info(name, entry), line_ending_stripped=stripped)

    def get(self, name: str) -> bytes:
        entry = self._document["secrets"].get(name)
        if entry is None:
            raise SecretNotFound(f"no secret named {name!r} (set it with `stockade secret set`)")
        try:
            return self._open(entry, self._associated(name, entry))
        except (InvalidTag, ValueError):
            raise SecretError(f"secret {name!r} does not decrypt: the store was altered") from None

    def remove(self, name: str) -> None:
        if self._document["secrets"].pop(name, None) is None:
            raise SecretNotFound(f"no secret named {name!r}")
        self._document["generation"] = self.generation + 1
        self._save()

    def list(self) -> list[SecretInfo]:
        return [self._info(n, e) for n, e in sorted(self._document["secrets"].items())]

    def _info(self, name: str, entry: dict[str, Any]) -> SecretInfo:
        return SecretInfo(name, self.backend, entry["created"], entry["rotated"], entry["version"])


__all__ = ["LocalSecretStore", "SecretError", "load_master_key"]
