"""State files that decide who may do what: sealed by the daemon, anchored in the audit trail.

The adversary here can write the state folder but holds no key (a local user in the
daemon's group, a restored backup, a careless script). Whoever can write a folder can
replace, delete or roll back any file in it. So every state file that grants or withholds
authority is **sealed** and every key that does is **pinned**:

- A sealed file is a header line, then the payload:
  `{"sealed":"stockade/v1","name":…,"generation":N,"seal":…}` + "\\n" + payload JSON.
  The seal is the daemon's Ed25519 audit-key signature over a domain-separated message
  naming the file, its generation and the exact payload bytes, so a file cannot be forged,
  edited, or swapped for another sealed file. Each save raises the generation.
- Anchored: every signed audit checkpoint carries `state` = {"files": {name: generation},
  "keys": {name: fingerprint}}. At start the newest *trusted* checkpoint is the floor: a file
  older than its anchored generation (an older sealed copy put back), missing, or not
  sealed, and a key whose fingerprint changed (a CA, token key, master key or daemon id
  swapped for one the writer made), stop the start with one line (exit 78), unless the
  operator accepts it (`stockaded --accept-state-rollback`, recorded first).

The file is written before the checkpoint that names its generation, so a crash in between
leaves a file *newer* than the anchor, which is accepted. Records that only need to be
authentic (a shared instance's adoption record, deleted when its server goes) are sealed
without an anchored generation.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.atomic import write_atomically

FORMAT = "stockade/v1"
CHECKPOINT_FIELD = "state"  # the checkpoint member that anchors the sealed state
_CONTEXT = b"stockade sealed state v1\x00"
_HEADER_LIMIT = 4096

RECOVERY = (
    "restore the state folder from a backup, or start with --accept-state-rollback to go "
    "on (that is recorded)"
)


class StateTampered(Exception):
    """A state file or key is not what the daemon last wrote: forged, rolled back, missing
    or swapped. The daemon must not start on it."""


def _message(name: str, generation: int, payload: bytes) -> bytes:
    return b"".join((_CONTEXT, name.encode(), b"\x00", str(generation).encode(), b"\x00", payload))


@dataclass
class StateSeal:
    """Seals and checks the daemon's state files; knows the anchored floor."""

    key: Ed25519PrivateKey
    anchored_files: Mapping[str, int] = field(default_factory=dict)
    anchored_keys: Mapping[str, str] = field(default_factory=dict)
    accept_rollback: bool = False
    # Called after each change once the daemon has started: sign a checkpoint naming it.
    publish: Callable[[], None] | None = None
    files: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)

    @classmethod
    def from_anchor(
        cls, key: Ed25519PrivateKey, anchored: Mapping[str, Any], *, accept_rollback: bool
    ) -> StateSeal:
        """The seal, with the floor from a trusted checkpoint's `state` member."""
        files = anchored.get("files", {}) if isinstance(anchored, Mapping) else {}
        keys = anchored.get("keys", {}) if isinstance(anchored, Mapping) else {}
        return cls(
            key,
            anchored_files={str(k): int(v) for k, v in dict(files).items()},
            anchored_keys={str(k): str(v) for k, v in dict(keys).items()},
            accept_rollback=accept_rollback,
        )

    def fields(self) -> dict[str, Any]:
        """What every checkpoint carries from now on (anchored values not yet seen kept)."""
        files = {**self.anchored_files, **self.files}
        keys = {**self.anchored_keys, **self.keys}
        return {"files": dict(sorted(files.items())), "keys": dict(sorted(keys.items()))}

    # -- files -----------------------------------------------------------------------

    def load(self, path: Path, name: str, *, anchored: bool = True) -> Any:
        """The payload of a sealed file (None if absent and nothing says it should exist).

        Raises StateTampered for a forged, foreign, older-than-anchored or missing file.
        What the operator accepts (`accept_rollback`) becomes the new floor, sealed anew."""
        floor = self.anchored_files.get(name, 0) if anchored else 0
        if not path.exists():
            if floor > 0:
                self._problem(
                    f"{path} is missing, but the audit trail vouches for its generation {floor}"
                )
                self.files[name] = 0
            return None
        header, payload = self._split(path, path.read_bytes())
        if header is None:
            if not anchored:
                raise StateTampered(f"{path} is not sealed by the daemon")
            # Written before sealing existed: taken once, while the trail has never named
            # this file, and sealed at once.
            if name in self.anchored_files:
                self._problem(f"{path} is not sealed by the daemon (replaced)")
            return self._reseal(path, name, payload)
        generation = header.get("generation")
        signature = header.get("seal")
        if (
            header.get("name") != name
            or not isinstance(generation, int)
            or isinstance(generation, bool)
            or not isinstance(signature, str)
            or not self._valid(signature, _message(name, generation, payload))
        ):
            forged = f"{path} does not carry the daemon's seal for {name!r} (forged)"
            if not anchored:
                raise StateTampered(forged)
            self._problem(forged)
            return self._reseal(path, name, payload)
        if generation < floor:
            self._problem(
                f"{path} is generation {generation}, older than generation {floor} that the "
                "audit trail vouches for (rolled back)"
            )
        if anchored:
            self.files[name] = generation
        return self._parse(path, payload)

    def _reseal(self, path: Path, name: str, payload: bytes) -> Any:
        data = self._parse(path, payload)
        self.save(path, name, data)
        return data

    def save(self, path: Path, name: str, payload: Any, *, anchored: bool = True) -> None:
        """Write `payload` sealed, one generation up; then anchor it (raises OSError)."""
        generation = max(self.files.get(name, 0), self.anchored_files.get(name, 0)) + 1
        body = json.dumps(payload, indent=2, sort_keys=True).encode() + b"\n"
        header = {
            "sealed": FORMAT,
            "name": name,
            "generation": generation,
            "seal": base64.b64encode(self.key.sign(_message(name, generation, body))).decode(),
        }
        write_atomically(path, json.dumps(header, sort_keys=True).encode() + b"\n" + body)
        if anchored:
            self.files[name] = generation
            self._published()

    # -- keys ------------------------------------------------------------------------

    def pin(self, name: str, fingerprint: str) -> None:
        """A key (or identity) that must stay the one the trail knows (StateTampered)."""
        known = self.anchored_keys.get(name)
        if known is not None and known != fingerprint:
            self._problem(
                f"the {name} is not the one the audit trail knows (fingerprint "
                f"{fingerprint[:16]}…, expected {known[:16]}…): it was replaced"
            )
        if self.keys.get(name) != fingerprint:
            self.keys[name] = fingerprint
            if known != fingerprint:
                self._published()

    # -- internals -------------------------------------------------------------------

    def _published(self) -> None:
        if self.publish is not None:
            self.publish()

    def _problem(self, text: str) -> None:
        if not self.accept_rollback:
            raise StateTampered(f"{text}; {RECOVERY}")
        self.accepted.append(text)

    def _valid(self, signature: str, message: bytes) -> bool:
        try:
            self.key.public_key().verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError):
            return False
        return True

    @staticmethod
    def _split(path: Path, data: bytes) -> tuple[dict[str, Any] | None, bytes]:
        """(header, payload) of a sealed file; (None, data) for an unsealed one."""
        end = data.find(b"\n", 0, _HEADER_LIMIT)
        if not data.startswith(b'{"generation"'):  # the header's first key, keys sorted
            return None, data
        if end < 0:
            raise StateTampered(f"{path}: its seal header is unreadable; {RECOVERY}")
        try:
            header = json.loads(data[:end])
        except ValueError:
            raise StateTampered(f"{path}: its seal header is unreadable; {RECOVERY}") from None
        if not isinstance(header, dict) or header.get("sealed") != FORMAT:
            raise StateTampered(f"{path}: its seal header is unreadable; {RECOVERY}")
        return header, data[end + 1 :]

    @staticmethod
    def _parse(path: Path, payload: bytes) -> Any:
        try:
            return json.loads(payload)
        except ValueError as exc:
            kind = exc.__class__.__name__
            raise StateTampered(f"{path} is not JSON ({kind}); {RECOVERY}") from None
