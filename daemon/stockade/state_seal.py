"""State files that decide who may do what: sealed by the daemon, anchored in the audit trail.

The adversary here can write the state folder but holds no key (a local user in the
daemon's group, a restored backup, a careless script). Whoever can write a folder can
replace, delete, rename or roll back any file in it. So every state file that grants or
withholds authority is **sealed** and every key that does is **pinned**:

- A sealed file is a header line, then the payload:
  `{"generation":N,"name":…,"seal":…,"sealed":"stockade/v1"}` + "\\n" + payload JSON.
  The seal is the daemon's Ed25519 audit-key signature over a domain-separated message
  naming the file, its generation and the exact payload bytes, so a file cannot be forged,
  edited, or swapped for another sealed file. Each save raises the generation.
- Anchored: every signed audit checkpoint carries `state` = {"files": {name: {generation,
  sha256}}, "keys": {name: fingerprint}}, absent files as generation 0. At start the
  newest checkpoint *in the log* whose signature verifies is the floor (`audit/anchor.py`):
  a file older than its anchored generation, of that generation but other bytes, missing,
  or not sealed, and a key whose fingerprint changed (a CA, token key, master key or daemon
  id swapped for one the writer made) stop the start with one line (exit 78). With
  `stockaded --accept-state-rollback` (recorded first) an older file is taken as it is, and
  a forged or unsealed one is moved aside and taken as absent: never sealed as if ours.

The file is written before the checkpoint that names it, so a crash in between leaves a file
one generation *newer* than the anchor, which is accepted. Plain files (from a version before
sealing) are taken once, only while the trail has never anchored any state. Records that only
need to be authentic (a shared instance's adoption record, deleted when its server goes) are
sealed without an anchored generation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.atomic import write_atomically
from stockade.wire import strict_json

FORMAT = "stockade/v1"
CHECKPOINT_FIELD = "state"  # the checkpoint member that anchors the sealed state
MAX_STATE_FILE_BYTES = 64 * 1024 * 1024  # a state file larger than this is not ours
_CONTEXT = b"stockade sealed state v1\x00"
_HEADER_LIMIT = 4096

RECOVERY = (
    "restore the state folder from a backup, or start with --accept-state-rollback to go "
    "on (that is recorded)"
)


class StateTampered(Exception):
    """A state file or key is not what the daemon last wrote: forged, rolled back, missing
    or swapped. The daemon must not start on it."""


@dataclass(frozen=True)
class Anchored:
    """What the trail vouches for about one file: its generation and its exact bytes."""

    generation: int
    sha256: str = ""  # empty: not known (the file was absent)


def _message(name: str, generation: int, payload: bytes) -> bytes:
    return b"".join((_CONTEXT, name.encode(), b"\x00", str(generation).encode(), b"\x00", payload))


def read_regular(path: Path) -> bytes | None:
    """A state file's bytes: None if absent; StateTampered if it is not a plain file of ours
    (a link, a FIFO, a device, a folder) or is too large. Never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateTampered(f"{path} cannot be opened ({exc.strerror}); {RECOVERY}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateTampered(f"{path} is not a regular file; {RECOVERY}")
        if info.st_size > MAX_STATE_FILE_BYTES:
            raise StateTampered(f"{path} is {info.st_size} bytes, too large; {RECOVERY}")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_STATE_FILE_BYTES:
                raise StateTampered(f"{path} grows while read; {RECOVERY}")
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class StateSeal:
    """Seals and checks the daemon's state files; knows the anchored floor."""

    key: Ed25519PrivateKey
    anchored_files: Mapping[str, Anchored] = field(default_factory=dict)
    anchored_keys: Mapping[str, str] = field(default_factory=dict)
    # True only while the trail has never anchored any state (a first start, or a state
    # folder from a version before sealing): plain files are then taken once.
    legacy_allowed: bool = True
    accept_rollback: bool = False
    # Called after each change once the daemon has started: sign a checkpoint naming it.
    publish: Callable[[], None] | None = None
    files: dict[str, Anchored] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)

    @classmethod
    def from_anchor(
        cls, key: Ed25519PrivateKey, anchored: Any, *, accept_rollback: bool
    ) -> StateSeal:
        """The seal, with the floor from a trusted checkpoint's `state` member (None or
        absent: the trail has never anchored state)."""
        if not isinstance(anchored, Mapping):
            return cls(key, accept_rollback=accept_rollback)
        files: dict[str, Anchored] = {}
        for name, value in dict(anchored.get("files", {})).items():
            if isinstance(value, Mapping):
                files[str(name)] = Anchored(int(value["generation"]), str(value["sha256"]))
            else:
                files[str(name)] = Anchored(int(value))
        keys = {str(k): str(v) for k, v in dict(anchored.get("keys", {})).items()}
        return cls(
            key,
            anchored_files=files,
            anchored_keys=keys,
            legacy_allowed=False,
            accept_rollback=accept_rollback,
        )

    def fields(self) -> dict[str, Any]:
        """What every checkpoint carries from now on (anchored values not yet seen kept)."""
        files = {**self.anchored_files, **self.files}
        keys = {**self.anchored_keys, **self.keys}
        return {
            "files": {
                name: {"generation": a.generation, "sha256": a.sha256}
                for name, a in sorted(files.items())
            },
            "keys": dict(sorted(keys.items())),
        }

    # -- files -----------------------------------------------------------------------

    def load(self, path: Path, name: str, *, anchored: bool = True) -> Any:
        """The payload of a sealed file (None if absent and nothing says it should exist).

        Raises StateTampered for a forged, foreign, older-than-anchored or missing file."""
        if not anchored:
            return self._load_authentic(path, name)
        floor = self.anchored_files.get(name, Anchored(0))
        data = read_regular(path)
        if data is None:
            if floor.generation > 0:
                self._problem(
                    f"{path} is missing, but the audit trail vouches for its generation "
                    f"{floor.generation}"
                )
            self.files[name] = Anchored(0)
            return None
        header, payload = self._split(path, data)
        if header is None:
            if not self.legacy_allowed:
                return self._refused(path, name, f"{path} is not sealed by the daemon")
            return self._reseal(path, name, payload)  # from before sealing: taken once
        generation = self._checked(path, name, header, payload)
        if generation is None:
            forged = f"{path} does not carry the daemon's seal for {name!r} (forged)"
            return self._refused(path, name, forged)
        digest = hashlib.sha256(data).hexdigest()
        if generation < floor.generation:
            self._problem(
                f"{path} is generation {generation}, older than generation "
                f"{floor.generation} that the audit trail vouches for (rolled back)"
            )
        elif generation == floor.generation and floor.sha256 and digest != floor.sha256:
            self._problem(
                f"{path} is generation {generation} but not the copy the audit trail vouches "
                "for (an earlier copy of a change that was never anchored)"
            )
        self.files[name] = Anchored(generation, digest)
        return self._parse(path, payload)

    def save(self, path: Path, name: str, payload: Any, *, anchored: bool = True) -> None:
        """Write `payload` sealed, one generation up; then anchor it (raises OSError)."""
        known = self.files.get(name, self.anchored_files.get(name, Anchored(0)))
        generation = known.generation + 1
        body = json.dumps(payload, indent=2, sort_keys=True).encode() + b"\n"
        header = {
            "generation": generation,
            "name": name,
            "seal": base64.b64encode(self.key.sign(_message(name, generation, body))).decode(),
            "sealed": FORMAT,
        }
        data = strict_json.dumps(header) + b"\n" + body
        write_atomically(path, data)
        if anchored:
            self.files[name] = Anchored(generation, hashlib.sha256(data).hexdigest())
            self._published()

    def trail_lost(self, leftovers: list[str]) -> None:
        """The trail is new but the folder is not: a fresh trail would vouch for whatever a
        writer left there (its own CA, keys, registry), so that is refused too."""
        self._problem(
            "the audit trail is empty, but the state folder holds a daemon's state "
            f"({', '.join(leftovers)}): it was deleted, and a new trail would vouch for "
            "whatever is there now"
        )

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

    def _load_authentic(self, path: Path, name: str) -> Any:
        """A record that must be ours, whatever its generation (raises StateTampered)."""
        data = read_regular(path)
        if data is None:
            return None
        header, payload = self._split(path, data)
        if header is None or self._checked(path, name, header, payload) is None:
            raise StateTampered(f"{path} is not sealed by the daemon for {name!r}")
        return self._parse(path, payload)

    def _checked(self, path: Path, name: str, header: dict[str, Any], payload: bytes) -> int | None:
        """The generation of a header whose seal is ours for `name`; None otherwise."""
        generation = header.get("generation")
        signature = header.get("seal")
        if (
            header.get("name") != name
            or not isinstance(generation, int)
            or isinstance(generation, bool)
            or not isinstance(signature, str)
            or not self._valid(signature, _message(name, generation, payload))
        ):
            return None
        return generation

    def _refused(self, path: Path, name: str, problem: str) -> Any:
        """A forged or unsealed file: refused; accepted by the operator, it is moved aside
        and taken as absent (its content is never sealed as if the daemon wrote it)."""
        self._problem(problem)
        aside = path.with_name(f"{path.name}.refused-{time.strftime('%Y%m%dT%H%M%SZ')}")
        os.replace(path, aside)
        self.files[name] = Anchored(0)
        return None

    def _reseal(self, path: Path, name: str, payload: bytes) -> Any:
        data = self._parse(path, payload)
        self.save(path, name, data)
        return data

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
        if not data.startswith(b'{"generation"'):  # the header's first key, keys sorted
            return None, data
        end = data.find(b"\n", 0, _HEADER_LIMIT)
        try:
            if end < 0:
                raise strict_json.StrictJSONError(0, "no end")
            header = strict_json.loads(data[:end])
        except strict_json.StrictJSONError:
            raise StateTampered(f"{path}: its seal header is unreadable; {RECOVERY}") from None
        if not isinstance(header, dict) or header.get("sealed") != FORMAT:
            raise StateTampered(f"{path}: its seal header is unreadable; {RECOVERY}")
        return header, data[end + 1 :]

    @staticmethod
    def _parse(path: Path, payload: bytes) -> Any:
        """The payload (the daemon's own bytes once the seal is checked; a plain file's
        before sealing existed)."""
        try:
            return json.loads(payload)
        except (ValueError, RecursionError) as exc:
            kind = exc.__class__.__name__
            raise StateTampered(f"{path} is not JSON ({kind}); {RECOVERY}") from None


def check_state_folders(state_dir: Path, names: tuple[str, ...]) -> None:
    """The state folder and its sub-folders are real folders of the daemon's own user, not
    links to a folder a writer controls (where a new key could be written for it to read,
    or a file the daemon writes could land elsewhere): StateTampered otherwise. Each is made
    private (0700) as it is found."""
    for folder in (state_dir, *(state_dir / name for name in names)):
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise StateTampered(f"{folder} is not a folder (a link, or a file); {RECOVERY}")
        if info.st_uid != os.geteuid():
            raise StateTampered(
                f"{folder} belongs to uid {info.st_uid}, not to the daemon's user; {RECOVERY}"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(folder, 0o700)
