"""Opening the daemon's audit log at start: key, anchor check, witnesses, then the log.

The order matters: the rollback check (`anchor.guard_start`) runs before anything is
written, so an accepted gap is the first record after it. The key's fingerprint is logged
at every start (and when the key is made), for verifiers to pin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from stockade.audit.anchor import Anchor, guard_start
from stockade.audit.chain import AUDIT_KEY_FILE, load_or_create_key, public_path
from stockade.audit.headroom import Headroom
from stockade.audit.log import AuditLog, AuditStartError, CheckpointObserver
from stockade.audit.witness import witnesses_from_settings
from stockade.config import Settings
from stockade.logs import get_logger
from stockade.secrets.generation import SECRETS_GENERATION
from stockade.state_seal import CHECKPOINT_FIELD as STATE_FIELD
from stockade.state_seal import StateSeal

log = get_logger("stockade.audit")


def anchor_of(settings: Settings) -> Anchor:
    return Anchor(
        settings.audit_anchor_dir or settings.state_dir / "audit-anchor",
        outside=settings.audit_witness_file,
    )


def unvouched_tail(directory: Path, signed_seq: int) -> dict[str, Any] | None:
    """The records after the last checkpoint the daemon signed (seq range, digest), if any."""
    lines = [
        line
        for path in sorted(directory.glob("audit-*.jsonl"))
        for line in path.read_bytes().split(b"\n")
        if line.strip()
    ]
    after = []
    for line in lines:
        try:
            seq = int(json.loads(line)["seq"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn tail: the log cuts and records it itself
        if seq > signed_seq:
            after.append((seq, line))
    if not signed_seq or not after:
        return None
    digest = hashlib.sha256(b"\n".join(line for _, line in after)).hexdigest()
    return {"from_seq": after[0][0], "to_seq": after[-1][0], "sha256": digest}


def open_audit_log(settings: Settings, daemon_id: str, *, accept_gap: bool = False) -> AuditLog:
    """The audit log, continued from where the last run left it, unless it was rolled back.

    Raises AuditRollback (the log is behind a head the daemon or a witness holds) or
    AuditStartError (the log cannot be opened)."""
    key_path = settings.state_dir / "pki" / AUDIT_KEY_FILE
    made = not key_path.exists()
    directory = settings.state_dir / "audit"
    anchor = anchor_of(settings)
    try:
        key = load_or_create_key(key_path)
        gap = guard_start(directory, anchor, accept_gap=accept_gap)
        observers: list[CheckpointObserver] = [anchor, *witnesses_from_settings(settings, anchor)]
        audit = AuditLog(
            directory,
            key,
            daemon_id=daemon_id,
            fsync_interval=settings.audit_fsync_interval_ms / 1000,
            checkpoint_records=settings.audit_checkpoint_records,
            checkpoint_seconds=settings.audit_checkpoint_seconds,
            max_file_bytes=settings.audit_max_file_bytes,
            observers=observers,
            headroom=Headroom(settings.audit_reserve_bytes, settings.audit_warn_free_bytes),
        )
        trusted = anchor.trusted_fields(directory, key.public_key())
        if SECRETS_GENERATION in trusted:
            audit.checkpoint_fields[SECRETS_GENERATION] = int(trusted[SECRETS_GENERATION])
        if isinstance(trusted.get(STATE_FIELD), dict):
            audit.checkpoint_fields[STATE_FIELD] = trusted[STATE_FIELD]
        first = ("audit.gap_accepted", gap) if gap is not None else None
        unvouched = unvouched_tail(directory, anchor.signed_seq())
        if first is None and unvouched is not None:
            # Records after the last checkpoint this daemon signed: a crash leaves them, and
            # so does anyone who can append to the folder. They are said as such before the
            # next checkpoint signs past them, so that `verify` reports them.
            first = ("audit.unvouched_tail", unvouched)
        audit.open(first=first)
        if gap is not None:
            anchor.set_aside_acknowledgements()
            audit.checkpoint()  # re-anchor at once: the head copy now names this history
    except (OSError, ValueError) as exc:
        raise AuditStartError(f"cannot open the audit log: {exc}") from None
    (log.warning if made else log.info)(
        "audit key made: give verifiers its fingerprint" if made else "audit key",
        fingerprint=audit.key_fingerprint,
        public_key=str(public_path(key_path)),
    )
    return audit


def open_state_seal(settings: Settings, audit: AuditLog, *, accept_rollback: bool) -> StateSeal:
    """The seal for the state folder's files, its floor the trusted checkpoint's `state`
    (none: the trail has never anchored state)."""
    key = load_or_create_key(settings.state_dir / "pki" / AUDIT_KEY_FILE)
    anchored = audit.checkpoint_fields.get(STATE_FIELD)
    return StateSeal.from_anchor(key, anchored, accept_rollback=accept_rollback)


def publish_state(audit: AuditLog, seal: StateSeal) -> None:
    """Anchor the state now, and after every change from here on (a signed checkpoint).

    Checkpoints are written on the event loop's thread only (the chain is one sequence): a
    change made in a worker thread has its checkpoint scheduled there."""
    loop = asyncio.get_running_loop()
    owner = threading.get_ident()

    def publish_now() -> None:
        audit.checkpoint_fields[STATE_FIELD] = seal.fields()
        audit.checkpoint()

    def publish() -> None:
        if threading.get_ident() == owner:
            publish_now()
        else:
            loop.call_soon_threadsafe(publish_now)

    publish_now()
    seal.publish = publish
