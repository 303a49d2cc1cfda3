"""Heads kept away from the log: what a verifier checks the log *extends*.

`head.json` sits beside the log, so whoever can cut the log can put an older head there.
Heads kept elsewhere are what catch that rollback:
- witnessed heads (`--witness FILE|DIR`): signed checkpoints the daemon sent off the host
  (a syslog collector's file, the append-only witness file). Any line holding a checkpoint
  JSON object counts, whatever prefix a collector added. Those of the daemon the log
  belongs to (its `daemon` id) must verify with the pinned key, and the log must hold each
  at its seq; other daemons' checkpoints (a shared collector) are skipped and counted, and
  finding none of this daemon's fails;
- a monitor's state (`--state FILE`): the newest head this verifier accepted last time
  (Certificate Transparency's monitor model). The next run fails on a log that does not
  extend it, then remembers the newest head it accepted now.

"Extends" means the log holds, at the head's seq, a line with exactly the head's bytes:
a shorter log, or one rewritten from that seq on, fails, naming the head's seq and time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stockade.atomic import write_atomically
from stockade.audit.chain import CHECKPOINT, canonical, fingerprint, line_hash
from stockade.audit.verify import VerifyResult, valid_signature

MAX_WITNESS_BYTES = 256 * 1024 * 1024  # a witness file is read whole; bound what we read


@dataclass(frozen=True)
class Head:
    """A signed checkpoint found outside the log, and where it was found."""

    where: str
    seq: int
    ts: str
    hash: str  # SHA-256 of the checkpoint's canonical line


class HeadError(Exception):
    """A witness or state file is unusable; the message names it."""


def _checkpoint_in(line: bytes) -> dict[str, Any] | None:
    start = line.find(b"{")
    if start < 0 or CHECKPOINT.encode() not in line:
        return None
    try:
        record = json.loads(line[start:].strip())
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("type") != CHECKPOINT:
        return None
    return record


def check_witnesses(result: VerifyResult, paths: list[Path], key: Ed25519PublicKey) -> None:
    """Fail `result` unless the log extends every witnessed head of its daemon."""
    heads, others = witnessed_heads(paths, key, set(result.daemons))
    if not heads:
        result.fail(
            ", ".join(map(str, paths)), "no witnessed checkpoint of this log's daemon found"
        )
        return
    for head in sorted(heads, key=lambda h: -h.seq):  # name the newest one missed
        check_extends(result, head, "witnessed head")
    if result.ok:
        result.notes.append(f"extends all {len(heads)} witnessed heads")
    if others:
        result.notes.append(f"{others} witnessed checkpoints of other daemons were skipped")


def witnessed_heads(
    paths: list[Path], key: Ed25519PublicKey, daemons: set[str]
) -> tuple[list[Head], int]:
    """The checkpoints of `daemons` in the witness files (folders: every file in them),
    and how many other daemons' were skipped."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise HeadError(f"{path}: no such witness file or folder")
    heads: list[Head] = []
    others = 0
    for path in files:
        if path.stat().st_size > MAX_WITNESS_BYTES:
            raise HeadError(f"{path}: over {MAX_WITNESS_BYTES} bytes; split it")
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            record = _checkpoint_in(line)
            if record is None:
                continue
            if record.get("daemon") not in daemons:
                others += 1
                continue
            where = f"{path}:{number}"
            if not valid_signature(key, record):
                raise HeadError(f"{where}: a witnessed checkpoint whose signature does not verify")
            heads.append(_head(where, record))
    return heads, others


def _head(where: str, record: dict[str, Any]) -> Head:
    return Head(where, int(record["seq"]), str(record.get("ts", "?")), line_hash(canonical(record)))


def check_extends(result: VerifyResult, head: Head, what: str) -> VerifyResult:
    """Fail `result` unless the verified log holds `head` at its seq."""
    if not result.ok:
        return result
    if head.seq > result.last_seq:
        return result.fail(
            head.where,
            f"the log ends at seq {result.last_seq}, behind the {what} at seq {head.seq} "
            f"({head.ts}): the log was cut or rolled back",
        )
    if result.heads.get(head.seq) != head.hash:
        return result.fail(
            head.where,
            f"the log does not hold the {what} at seq {head.seq} ({head.ts}): "
            "it was rewritten from there",
        )
    return result


def load_state(path: Path, key: Ed25519PublicKey) -> Head | None:
    """The head this verifier accepted last time (None on the first run)."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_bytes())
        head = Head(f"{path}", int(state["seq"]), str(state["ts"]), str(state["hash"]))
        pinned = str(state["key_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadError(f"{path}: not a verifier state file ({exc.__class__.__name__})") from None
    if pinned != fingerprint(key):
        raise HeadError(
            f"{path}: accepted with key {pinned[:16]}…, not the key given now "
            f"({fingerprint(key)[:16]}…): the key was changed"
        )
    return head


def save_state(path: Path, result: VerifyResult, key: Ed25519PublicKey) -> None:
    """Remember the newest head the log was accepted at."""
    record = result.last_checkpoint
    if record is None:
        return
    state = {
        "seq": int(record["seq"]),
        "ts": record.get("ts"),
        "hash": line_hash(canonical(record)),
        "key_fingerprint": fingerprint(key),
    }
    write_atomically(path, json.dumps(state, sort_keys=True).encode() + b"\n")
