"""Check an audit trail: the hash chain, the checkpoint signatures, and the signed head.

Needs only the files and the public key (no daemon). Reports the first bad line as
`FILE:LINE: problem`. Kinds of tampering and how each shows:
- an edited, inserted, deleted or reordered line: the next line's `prev` (or `seq`) is wrong;
- a forged checkpoint: its signature does not verify;
- lines cut from the end: the chain ends before the signed head (`head.json`) says it does;
  lines after the last checkpoint are reported as not yet signed, so a cut there is said
  to be undetectable rather than silently accepted;
- a missing `head.json` fails (`require_head=False` accepts it and says so in the notes);
- a deleted prefix: the chain must start at seq 1 from GENESIS (give archived files first).

`head.json` sits beside the log, so it only catches a careless cut. A rollback of the
whole folder (log cut at an old checkpoint, that checkpoint copied into head.json) is caught
by heads kept elsewhere: witnessed heads and a monitor's state (`audit/heads.py`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stockade.audit.chain import (
    CHECKPOINT,
    FILE_PATTERN,
    GENESIS,
    HEAD_FILE,
    checkpoint_message,
    line_hash,
)


@dataclass
class VerifyResult:
    ok: bool = True
    problem: str | None = None  # the first failure, `FILE:LINE: what`
    records: int = 0
    checkpoints: int = 0
    last_seq: int = 0
    unsigned_tail: int = 0  # records after the last checkpoint
    first_seq: int = 0
    signatures: dict[int, str] = field(default_factory=dict)  # checkpoint seq -> signature
    heads: dict[int, str] = field(default_factory=dict)  # checkpoint seq -> its line's hash
    last_checkpoint: dict[str, Any] | None = None  # the newest signed checkpoint, whole
    daemons: list[str] = field(default_factory=list)  # the daemon ids the records name
    notes: list[str] = field(default_factory=list)
    unvouched: list[str] = field(default_factory=list)  # seq ranges said unvouched at start

    def fail(self, where: str, what: str) -> VerifyResult:
        self.ok = False
        self.problem = f"{where}: {what}"
        return self


def audit_files(paths: list[Path]) -> list[Path]:
    """Files in chain order: directories give their audit-*.jsonl, sorted."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.glob(FILE_PATTERN)) if path.is_dir() else [path])
    return files


def valid_signature(key: Ed25519PublicKey, record: dict[str, Any]) -> bool:
    try:
        signature = base64.b64decode(record.get("signature", ""), validate=True)
        key.verify(signature, checkpoint_message(record))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


def _lines(files: list[Path]) -> Iterator[tuple[str, bytes] | str]:
    """(FILE:LINE, bytes) for every line in chain order; a bare str marks a torn last line."""
    for path in files:
        lines = path.read_bytes().split(b"\n")
        torn = lines.pop() != b""  # a whole file ends with a newline
        for number, line in enumerate(lines, start=1):
            yield f"{path}:{number}", line
        if torn:
            yield f"{path}:{len(lines) + 1}"


def _broken_link(
    where: tuple[str, str], seqs: tuple[int, int], line: bytes, following: dict[str, Any] | None
) -> tuple[str, str]:
    """Name the line a broken `prev` points at, and what happened to it."""
    here, before = where
    record_seq, seq = seqs
    if record_seq != seq + 1:
        return (
            here,
            f"out of place: seq {record_seq} after seq {seq} (a line was removed, "
            "inserted or moved here)",
        )
    if following is not None and following.get("prev") != line_hash(line):
        return here, "edited (its own hash and the next line's record of it disagree)"
    return before, "edited (the next line's record of its hash no longer matches)"


def verify(
    files: list[Path],
    key: Ed25519PublicKey,
    head: Path | None = None,
    *,
    require_head: bool = True,
) -> VerifyResult:
    result = VerifyResult()
    prev: str | None = None  # None before the first record, which must be seq 1
    seq = 0
    entries = list(_lines(files))
    where = ""
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            return result.fail(entry, "truncated record (no line end)")
        where, line = entry
        try:
            record = json.loads(line)
            record_seq, record_prev = int(record["seq"]), str(record["prev"])
        except (ValueError, KeyError, TypeError):
            return result.fail(where, "not an audit record (edited or corrupted)")
        problem = _link_problem(entries, index, (prev, seq), (record_seq, record_prev))
        if problem is not None:
            return result.fail(*problem)
        if record.get("type") == CHECKPOINT:
            if not valid_signature(key, record):
                return result.fail(where, "checkpoint signature does not verify")
            result.checkpoints += 1
            result.signatures[record_seq] = str(record["signature"])
            result.heads[record_seq] = line_hash(line)
            result.last_checkpoint = record
            result.unsigned_tail = 0
        else:
            result.unsigned_tail += 1
        if record.get("type") == "audit.unvouched_tail":
            detail = record.get("detail") or {}
            result.unvouched.append(f"{detail.get('from_seq')}-{detail.get('to_seq')}")
        if record.get("daemon") not in result.daemons:
            result.daemons.append(str(record.get("daemon")))
        result.first_seq = result.first_seq or record_seq
        prev, seq = line_hash(line), record_seq
        result.records += 1
    result.last_seq = seq
    return _check_head(result, key, head, where, require_head)


def _link_problem(
    entries: list[tuple[str, bytes] | str],
    index: int,
    before: tuple[str | None, int],
    record: tuple[int, str],
) -> tuple[str, str] | None:
    """What is wrong with how the record at `index` follows the one before, if anything."""
    prev, seq = before
    record_seq, record_prev = record
    entry, previous = entries[index], entries[index - 1]
    if isinstance(entry, str):  # a torn line (the walk stops at one before this)
        return entry, "truncated record (no line end)"
    where, line = entry
    if prev is None:
        if record_seq != 1 or record_prev != GENESIS:
            return (
                where,
                f"the log starts at seq {record_seq}, not 1: the records before it are "
                "missing (give the archived earlier files before these)",
            )
    elif record_prev != prev:
        previous_where = previous if isinstance(previous, str) else previous[0]
        following = _record_at(entries, index + 1)
        return _broken_link((where, previous_where), (record_seq, seq), line, following)
    elif record_seq != seq + 1:
        return where, f"sequence jumps from {seq} to {record_seq}"
    return None


def _record_at(entries: list[tuple[str, bytes] | str], index: int) -> dict[str, Any] | None:
    if index >= len(entries) or isinstance(entries[index], str):
        return None
    try:
        record = json.loads(entries[index][1])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _check_head(
    result: VerifyResult,
    key: Ed25519PublicKey,
    head: Path | None,
    last_where: str,
    require_head: bool,
) -> VerifyResult:
    if head is None or not head.exists():
        _no_head(result, head, require_head)
    else:
        try:
            signed = json.loads(head.read_bytes())
        except ValueError:
            return result.fail(str(head), "not a signed head")
        if not isinstance(signed, dict) or "seq" not in signed:
            return result.fail(str(head), "not a signed head")
        if not valid_signature(key, signed):
            return result.fail(str(head), "head signature does not verify")
        if int(signed["seq"]) > result.last_seq:
            return result.fail(
                last_where or str(head),
                f"the log ends at seq {result.last_seq} but the signed head is at seq "
                f"{signed['seq']}: records were removed from the end",
            )
        if (
            int(signed["seq"]) >= result.first_seq
            and result.signatures.get(int(signed["seq"])) != signed["signature"]
        ):
            return result.fail(str(head), "the signed head's checkpoint is not in the log")
    if result.ok and result.unvouched:
        result.notes.append(
            "records written after a signed checkpoint and before a restart were not vouched "
            "for by a signature when written (a crash, or someone appending to the folder): "
            + ", ".join(result.unvouched)
        )
    if result.ok and result.unsigned_tail:
        result.notes.append(
            f"{result.unsigned_tail} records after the last checkpoint are not yet signed: "
            "a cut there could not be detected"
        )
    return result


def _no_head(result: VerifyResult, head: Path | None, require_head: bool) -> None:
    if require_head:
        result.fail(
            str(head or HEAD_FILE),
            "the signed head is missing: a cut from the end could not be detected "
            "(--no-head accepts that)",
        )
    else:
        result.notes.append(
            "no signed head (accepted with --no-head): a cut from the end could not be detected"
        )


def default_head(files: list[Path]) -> Path | None:
    """The head.json next to the newest file, if any."""
    return files[-1].parent / HEAD_FILE if files else None
