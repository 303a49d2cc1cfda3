"""The daemon's memory of its audit log, kept outside the audit folder, and the start check.

Whoever can write the audit folder can cut the log back to an old checkpoint and copy that
checkpoint into `head.json`: nothing in the folder then disagrees. So the daemon keeps, in
its anchor folder (default STATE_DIR/audit-anchor, setting `audit_anchor_dir`; best on
another filesystem):
- `head.json`: a copy of every signed checkpoint it publishes, written after the log is
  fsynced up to it (so a crash never leaves the copy ahead of the log);
- `witness-NAME.json`: the last checkpoint each witness acknowledged (seq, hash, time).

At start, before anything is written, `guard_start` checks that the log holds every one of
these heads (and the one in the audit folder's head.json) at its seq, byte for byte. If it
does not, the log was cut or rolled back, and the daemon refuses to write on it
(`AuditRollback`: one line, exit 78) unless the operator accepts the gap
(`stockaded --accept-audit-gap`); the acceptance is then the first record written, the old
acknowledgements are set aside, and a checkpoint re-anchors the log at once.

A missing anchor with a log that exists counts as a rollback too (deleting the anchor
would otherwise switch the check off); a brand-new state starts with an empty anchor.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stockade.atomic import write_atomically
from stockade.audit.chain import CHECKPOINT, FILE_PATTERN, HEAD_FILE, line_hash
from stockade.audit.verify import valid_signature
from stockade.logs import get_logger

log = get_logger("stockade.audit.anchor")

ACK_PREFIX = "witness-"
CHECKPOINT_MARK = f'"type":"{CHECKPOINT}"'.encode()


class AuditRollback(Exception):
    """The log is behind a head the daemon knows it signed: it must not be written on."""


@dataclass(frozen=True)
class KnownHead:
    """A checkpoint the log must hold: where it is known from, its seq, line hash and time."""

    source: str
    seq: int
    hash: str
    ts: str
    record: dict[str, Any] | None = None


class Anchor:
    """The anchor folder: the head copy and the witnesses' acknowledgements."""

    def __init__(self, directory: Path, outside: Path | None = None) -> None:
        self.directory = directory
        # The file witness, when one is set: on another filesystem, out of a writer of the
        # state folder's reach, so its last checkpoint binds even a rollback of the whole
        # folder (anchor included) at the daemon's own start.
        self.outside = outside

    @property
    def head_path(self) -> Path:
        return self.directory / HEAD_FILE

    def head(self) -> KnownHead | None:
        """The copy of the last signed head; seq 0 for a fresh anchor; None if absent."""
        if not self.head_path.exists():
            return None
        return _known(f"the daemon's head copy {self.head_path}", self.head_path.read_bytes())

    def initialise(self) -> None:
        """An empty anchor (seq 0), for a state with no log yet."""
        write_atomically(self.head_path, b'{"seq":0}')

    def published(self, line: bytes, record: dict[str, Any]) -> None:
        """Keep a copy of a checkpoint the log now durably holds (raises OSError)."""
        write_atomically(self.head_path, line)

    def acknowledged(self, witness: str, record: dict[str, Any], line: bytes) -> None:
        ack = {"seq": record["seq"], "hash": line_hash(line), "ts": record.get("ts")}
        ack["acknowledged"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_atomically(self._ack_path(witness), json.dumps(ack, sort_keys=True).encode())

    def acknowledgements(self) -> dict[str, KnownHead]:
        found: dict[str, KnownHead] = {}
        for path in sorted(self.directory.glob(f"{ACK_PREFIX}*.json")):
            name = path.stem.removeprefix(ACK_PREFIX)
            known = _known(f"witness {name}'s acknowledgement {path}", path.read_bytes())
            if known is not None:
                found[name] = known
        return found

    def set_aside_acknowledgements(self) -> None:
        """After an accepted gap: the old acknowledgements describe a history now gone."""
        folder = self.directory / f"superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        for path in self.directory.glob(f"{ACK_PREFIX}*.json"):
            folder.mkdir(mode=0o700, exist_ok=True)
            path.replace(folder / path.name)

    def _ack_path(self, witness: str) -> Path:
        return self.directory / f"{ACK_PREFIX}{witness}.json"

    async def run(self) -> None:
        """Nothing in the background: copies are written as checkpoints are published."""

    async def flush(self, timeout: float) -> None:
        """Nothing pending: every copy was written when its checkpoint was published."""

    def status(self) -> list[tuple[str, str, int]]:
        return []

    def trusted_fields(self, audit_dir: Path, key: Ed25519PublicKey) -> dict[str, Any]:
        """The fields of the newest checkpoint in the log (after `guard_start` found that it
        holds every known head), which must carry the daemon's signature.

        The log, not a head copy: head copies live where a writer of the state folder can
        put back an older one (or `{"seq":0}`), but the log must hold every head and extends
        them, so its newest checkpoint is at least as new as any. A head that claims a
        signature it does not have is a forgery too: refused, never trusted.
        """
        heads = [h for h in known_heads(audit_dir, self) if h.record and "signature" in h.record]
        for head in heads:
            assert head.record is not None  # noqa: S101 - filtered above
            if not valid_signature(key, head.record):
                raise AuditRollback(
                    f"{head.source}: checkpoint {head.seq} does not carry the daemon's "
                    "signature (forged)"
                )
        newest = newest_checkpoint(audit_dir)
        if newest is None:
            return {}
        if not valid_signature(key, newest):
            raise AuditRollback(
                f"the log's newest checkpoint (seq {newest.get('seq')}) does not carry the "
                "daemon's signature: the audit key was replaced or the log forged"
            )
        return newest

    def signed_seq(self) -> int:
        """The seq of the last checkpoint the daemon itself copied here (0 if none)."""
        head = self.head()
        return head.seq if head is not None else 0


def newest_checkpoint(audit_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint record of the log (None: it has none)."""
    for path in reversed(_log_lines(audit_dir)):
        for line in reversed(path.read_bytes().split(b"\n")):
            if CHECKPOINT_MARK in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn tail: the log cuts and records it itself
                if isinstance(record, dict) and record.get("type") == CHECKPOINT:
                    return record
    return None


def _known(source: str, data: bytes) -> KnownHead:
    """A head from a copy or an acknowledgement; an unreadable one is a problem in itself."""
    try:
        record = json.loads(data)
        seq = int(record["seq"])
        if seq == 0:
            return KnownHead(source, 0, "", "")
        digest = str(record["hash"]) if "hash" in record else line_hash(data.rstrip(b"\n"))
        return KnownHead(source, seq, digest, str(record.get("ts", "?")), record)
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditRollback(f"{source} is unreadable ({exc.__class__.__name__})") from None


def _log_lines(audit_dir: Path) -> list[Path]:
    return sorted(audit_dir.glob(FILE_PATTERN))


def _tip(files: list[Path]) -> int:
    """The seq of the last whole line of the log (0 for no log)."""
    for path in reversed(files):
        data = path.read_bytes()
        end = data.rfind(b"\n")
        if end < 0:
            continue
        start = data.rfind(b"\n", 0, end) + 1
        return int(json.loads(data[start:end])["seq"])
    return 0


def _holds(files: list[Path], head: KnownHead, hashes: dict[Path, set[str]]) -> bool:
    """Whether some whole line of the log is exactly this head (its hash covers its seq).

    `hashes` caches each file's line hashes: every head is usually in the newest file."""
    hinted = str(head.record.get("file", "")) if head.record else ""
    ordered = sorted(files, key=lambda p: p.name != hinted)  # the file it names first
    for path in ordered:
        if path not in hashes:
            hashes[path] = {line_hash(line) for line in path.read_bytes().split(b"\n")[:-1]}
        if head.hash in hashes[path]:
            return True
    return False


def known_heads(audit_dir: Path, anchor: Anchor) -> list[KnownHead]:
    """Every head the log must hold: head.json, the anchor's copy, each acknowledgement."""
    heads: list[KnownHead] = []
    beside = audit_dir / HEAD_FILE
    if beside.exists():
        heads.append(_known(f"the signed head {beside}", beside.read_bytes()))
    copy = anchor.head()
    if copy is not None:
        heads.append(copy)
    heads.extend(anchor.acknowledgements().values())
    if anchor.outside is not None:
        last = _last_line_of(anchor.outside)
        if last:
            heads.append(_known(f"the file witness {anchor.outside}", last))
    return heads


def _last_line_of(path: Path) -> bytes:
    """The last whole line of an append-only file (b"" if none): read from its end."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 65536))
            tail = handle.read()
    except FileNotFoundError:
        return b""
    lines = [line for line in tail.split(b"\n") if line.strip()]
    return lines[-1] if lines and tail.endswith(b"\n") else (lines[-2] if len(lines) > 1 else b"")


def find_gaps(audit_dir: Path, anchor: Anchor) -> list[str]:
    """One line per known head the log does not hold (empty: the log extends them all)."""
    files = _log_lines(audit_dir)
    try:
        tip = _tip(files)
    except (ValueError, KeyError, TypeError):
        return [f"the last line of {files[-1]} is not an audit record"]
    problems: list[str] = []
    hashes: dict[Path, set[str]] = {}
    copy = anchor.head()
    if copy is None and tip > 0:
        problems.append(
            f"the daemon's head copy {anchor.head_path} is missing although the log exists "
            "(deleted, or the anchor folder moved)"
        )
    elif copy is not None and copy.seq == 0 and newest_checkpoint(audit_dir) is not None:
        problems.append(
            f"the daemon's head copy {anchor.head_path} says no checkpoint was ever signed, "
            "but the log holds one (reset)"
        )
    for head in known_heads(audit_dir, anchor):
        if head.seq == 0 or _holds(files, head, hashes):
            continue
        if tip < head.seq:
            problems.append(
                f"the log ends at seq {tip}, behind {head.source} at seq {head.seq} "
                f"({head.ts}): it was cut or rolled back"
            )
        else:
            problems.append(
                f"the log does not hold {head.source} at seq {head.seq} ({head.ts}): "
                "it was rewritten"
            )
    return problems


def guard_start(audit_dir: Path, anchor: Anchor, *, accept_gap: bool) -> dict[str, Any] | None:
    """Refuse a rolled-back log (AuditRollback), or return what an accepted gap records."""
    if not anchor.head_path.exists() and not _log_lines(audit_dir):
        anchor.initialise()
        return None
    problems = find_gaps(audit_dir, anchor)
    if not problems:
        return None
    if not accept_gap:
        raise AuditRollback(
            f"{problems[0]}; refusing to write on it (restore the audit folder, or start "
            "with --accept-audit-gap to go on: that is recorded)"
        )
    log.warning("audit gap accepted by the operator", problems=problems)
    return {"problems": problems, "accepted_by": "stockaded --accept-audit-gap"}
