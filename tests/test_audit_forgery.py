"""A writer of the state folder (no key; the anchor elsewhere untouched) cannot get the daemon
to trust or silently sign what it forged: a fake checkpoint in head.json, or records
appended to the log while the daemon was stopped."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from pathlib import Path

import pytest

from stockade.audit.anchor import AuditRollback
from stockade.audit.chain import canonical, line_hash, public_path
from stockade.audit.startup import open_audit_log
from stockade.audit.verify import audit_files, verify
from stockade.config import Settings
from stockade.daemon import open_secret_store
from stockade.secrets.generation import open_anchored, record_change


def settings_for(root: Path) -> Settings:
    (root / "state").mkdir(exist_ok=True)
    return Settings(state_dir=root / "state", audit_anchor_dir=root / "elsewhere" / "anchor")


def append_forged(log_dir: Path, **fields: object) -> dict[str, object]:
    """Append a record chained to the last line by plain SHA-256: all a key-less writer can."""
    path = sorted(log_dir.glob("audit-*.jsonl"))[-1]
    last = path.read_bytes().rstrip(b"\n").split(b"\n")[-1]
    previous = json.loads(last)
    forged = {
        "seq": previous["seq"] + 1,
        "prev": line_hash(last),
        "ts": previous["ts"],
        "daemon": previous["daemon"],
        **fields,
    }
    with path.open("ab") as handle:
        handle.write(canonical(forged) + b"\n")
    return forged


def test_a_forged_checkpoint_cannot_bring_back_a_rotated_secret(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)

    async def start() -> tuple[object, object]:
        audit = open_audit_log(settings, "d1")
        store = await open_anchored(audit, functools.partial(open_secret_store, settings))
        return audit, store

    async def scenario() -> None:
        audit, store = await start()
        store.set("token", b"OLD", rotate=False)  # type: ignore[attr-defined]
        await record_change(audit, store, "token", "set")  # type: ignore[arg-type]
        shutil.copy(settings.state_dir / "secrets.json", tmp_path / "old-copy.json")
        store.set("token", b"NEW", rotate=True)  # type: ignore[attr-defined]
        await record_change(audit, store, "token", "rotate")  # type: ignore[arg-type]
        await audit.close()  # type: ignore[attr-defined]
        # the attack: the old store, and a "checkpoint" naming its generation, unsigned
        shutil.copy(tmp_path / "old-copy.json", settings.state_dir / "secrets.json")
        audit_dir = settings.state_dir / "audit"
        fake = append_forged(
            audit_dir, type="audit.checkpoint", secrets_generation=1, signature="AAAA"
        )
        (audit_dir / "head.json").write_bytes(canonical(fake))
        with pytest.raises(AuditRollback, match="does not carry the daemon's signature"):
            await start()

    asyncio.run(scenario())


def test_records_appended_while_the_daemon_was_stopped_are_never_signed_silently(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path)
    audit_dir = settings.state_dir / "audit"

    async def run_once(target: str) -> None:
        audit = open_audit_log(settings, "d1")
        await audit.record("request", outcome="allow", action="tools/call", target=target)
        await audit.close()

    asyncio.run(run_once("get_me"))
    forged = append_forged(
        audit_dir, type="request", outcome="allow", action="tools/call", target="delete_repo"
    )
    asyncio.run(run_once("get_me"))
    records = [json.loads(line) for line in (audit_dir / "audit-000001.jsonl").open()]
    said = [r for r in records if r["type"] == "audit.unvouched_tail"]
    assert said and said[0]["detail"]["from_seq"] == forged["seq"]
    key = public_path(settings.state_dir / "pki" / "audit-key.pem")
    from stockade.audit.chain import load_public_key

    files = audit_files([audit_dir])
    result = verify(files, load_public_key(key), audit_dir / "head.json")
    assert result.ok
    assert any("not vouched for" in note for note in result.notes)  # verify reports it
