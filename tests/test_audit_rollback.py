"""Issue 15: a verifier that does not trust what sits beside the log.

Each test plays an attacker who can write the audit folder (and the key beside it) but holds
no key of the daemon's, and shows `stockade audit verify` catches them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.audit.anchor import Anchor, AuditRollback, guard_start
from stockade.audit.chain import fingerprint, load_or_create_key, load_public_key, public_path
from stockade.audit.log import AuditLog
from stockade.audit.verify import audit_files
from tests.test_audit import write_log


def stockade(*args: str, env_config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI, with no verifier config from the machine (only `env_config`, if given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["XDG_CONFIG_HOME"] = "/nonexistent"
    if env_config is not None:
        env["STOCKADE_VERIFY_CONFIG"] = str(env_config)
    return subprocess.run(
        [str(Path(sys.executable).parent / "stockade"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _verify(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return stockade("audit", "verify", "--dir", str(folder / "audit"), *args)


def _checkpoints(path: Path) -> list[tuple[int, bytes]]:
    """(line number, line) of every checkpoint in an audit file."""
    lines = path.read_bytes().splitlines(keepends=True)
    return [(n, line) for n, line in enumerate(lines) if b'"audit.checkpoint"' in line]


def _roll_back(folder: Path) -> tuple[dict[str, object], dict[str, object]]:
    """Cut the log right after an earlier checkpoint and copy that one into head.json.

    Returns (the head rolled back to, the real head that was cut off)."""
    path = audit_files([folder / "audit"])[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    marks = _checkpoints(path)
    (number, old), (_, newest) = marks[1], marks[-1]
    path.write_bytes(b"".join(lines[: number + 1]))
    (folder / "audit" / "head.json").write_bytes(old.rstrip(b"\n"))
    return json.loads(old), json.loads(newest)


def test_a_rollback_with_an_old_head_is_caught_by_the_monitor_state(tmp_path: Path) -> None:
    key = str(public_path(write_log(tmp_path, 60, checkpoint_records=10)))
    state = tmp_path / "monitor.json"
    first = _verify(tmp_path, "--key", key, "--state", str(state))
    assert first.returncode == 0, first.stdout
    remembered = json.loads(state.read_text())
    old, newest = _roll_back(tmp_path)
    assert remembered["seq"] == newest["seq"]
    # The attack: head.json alone cannot tell (it is a copy of a line in the log).
    assert _verify(tmp_path, "--key", key).returncode == 0
    caught = _verify(tmp_path, "--key", key, "--state", str(state))
    assert caught.returncode == 2, caught.stdout
    assert f"behind the head this verifier accepted before at seq {newest['seq']}" in caught.stdout
    assert str(newest["ts"]) in caught.stdout
    assert json.loads(state.read_text()) == remembered  # a failed run does not move it
    assert int(str(old["seq"])) < int(str(newest["seq"]))


def test_a_rollback_behind_a_witnessed_head_fails_naming_it(tmp_path: Path) -> None:
    key = str(public_path(write_log(tmp_path, 60, checkpoint_records=10)))
    witness = tmp_path / "witness" / "heads.log"
    witness.parent.mkdir()
    # What a syslog collector holds: its own prefix, then the checkpoint JSON.
    path = audit_files([tmp_path / "audit"])[-1]
    witness.write_bytes(
        b"".join(
            b"2026-11-25T08:00:00Z host stockaded[1] checkpoint " + line
            for _, line in _checkpoints(path)
        )
    )
    # A shared collector also holds another daemon's checkpoints (another key): skipped.
    other = tmp_path / "other"
    _write_other_daemon_log(other)
    with witness.open("ab") as shared:
        for _, line in _checkpoints(audit_files([other / "audit"])[-1]):
            shared.write(b"2026-11-25T08:00:01Z host2 stockaded[2] checkpoint " + line)
    whole = _verify(tmp_path, "--key", key, "--witness", str(witness))
    assert whole.returncode == 0, whole.stdout
    assert "extends all 6 witnessed heads" in whole.stdout
    assert "checkpoints of other daemons were skipped" in whole.stdout
    _, newest = _roll_back(tmp_path)
    caught = _verify(tmp_path, "--key", key, "--witness", str(witness.parent))
    assert caught.returncode == 2, caught.stdout
    assert f"behind the witnessed head at seq {newest['seq']} ({newest['ts']})" in caught.stdout


def _write_other_daemon_log(folder: Path) -> None:
    async def run() -> None:
        key = load_or_create_key(folder / "pki" / "audit-key.pem")
        log = AuditLog(folder / "audit", key, daemon_id="another-daemon", checkpoint_records=5)
        log.open()
        for n in range(12):
            await log.record("request", outcome="allow", target=str(n))
        await log.close()

    asyncio.run(run())


def test_a_deleted_head_fails_unless_accepted_and_said(tmp_path: Path) -> None:
    key = str(public_path(write_log(tmp_path, 30, checkpoint_records=10)))
    (tmp_path / "audit" / "head.json").unlink()
    missing = _verify(tmp_path, "--key", key)
    assert missing.returncode == 2, missing.stdout
    assert "the signed head is missing" in missing.stdout
    accepted = _verify(tmp_path, "--key", key, "--no-head")
    assert accepted.returncode == 0, accepted.stdout
    assert "no signed head (accepted with --no-head)" in accepted.stdout


def test_a_deleted_prefix_fails_unless_the_archive_is_given(tmp_path: Path) -> None:
    key = str(public_path(write_log(tmp_path, 400, max_file_bytes=16 * 1024)))
    files = audit_files([tmp_path / "audit"])
    assert len(files) > 2
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.move(files[0], archive / files[0].name)
    cut = _verify(tmp_path, "--key", key)
    assert cut.returncode == 2, cut.stdout
    assert f"{files[1]}:1: the log starts at seq " in cut.stdout
    assert "records before it are missing" in cut.stdout
    whole = stockade(
        "audit", "verify", "--key", key, str(archive / files[0].name), str(tmp_path / "audit")
    )
    assert whole.returncode == 0, whole.stdout


def test_a_key_swap_fails_against_the_pinned_key(tmp_path: Path) -> None:
    real = tmp_path / "real"
    exported = tmp_path / "exported.pub"
    shutil.copy(public_path(write_log(real, 30, checkpoint_records=10)), exported)
    pinned = fingerprint(load_public_key(exported))
    printed = stockade("audit", "key", "--key", str(exported), "--fingerprint")
    assert printed.stdout.strip() == pinned
    # The attacker re-signs a whole log with a key of their own and puts it beside the log.
    forged = tmp_path / "forged"
    write_log(forged, 30, checkpoint_records=10)
    shutil.rmtree(real / "audit")
    shutil.copytree(forged / "audit", real / "audit")
    shutil.copy(forged / "pki" / "audit-key.pub", real / "pki" / "audit-key.pub")
    unpinned = _verify(real)
    assert unpinned.returncode == 1
    assert "the key beside the log is not trusted" in unpinned.stderr
    by_fingerprint = _verify(real, "--key-fingerprint", pinned)
    assert by_fingerprint.returncode == 2, by_fingerprint.stdout
    assert f"not the pinned {pinned}: the key was replaced" in by_fingerprint.stdout
    by_key = _verify(real, "--key", str(exported))
    assert by_key.returncode == 2
    assert "checkpoint signature does not verify" in by_key.stdout
    config = tmp_path / "verify.toml"
    config.write_text(f'key_fingerprint = "{pinned}"\n')
    by_config = stockade("audit", "verify", "--dir", str(real / "audit"), env_config=config)
    assert by_config.returncode == 2
    assert "the key was replaced" in by_config.stdout


def test_the_start_check_holds_the_log_to_each_witness_acknowledgement(tmp_path: Path) -> None:
    """Even with the daemon's own head copy rolled back too, an acknowledgement catches it."""
    anchor = Anchor(tmp_path / "anchor")
    assert guard_start(tmp_path / "audit", anchor, accept_gap=False) is None  # a fresh state

    async def run() -> None:
        key = load_or_create_key(tmp_path / "pki" / "audit-key.pem")
        log = AuditLog(tmp_path / "audit", key, daemon_id="t", observers=[anchor])
        log.open()
        for n in range(30):
            await log.record("request", outcome="allow", target=str(n))
            if n % 10 == 9:
                log.checkpoint()
        await log.close()

    asyncio.run(run())
    newest = json.loads(anchor.head_path.read_bytes())
    anchor.acknowledged("syslog", newest, anchor.head_path.read_bytes())
    assert guard_start(tmp_path / "audit", anchor, accept_gap=False) is None
    old, _ = _roll_back(tmp_path)
    with pytest.raises(AuditRollback, match="behind the daemon's head copy"):
        guard_start(tmp_path / "audit", anchor, accept_gap=False)
    anchor.head_path.write_bytes(json.dumps(old, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(AuditRollback) as caught:
        guard_start(tmp_path / "audit", anchor, accept_gap=False)
    assert "behind witness syslog's acknowledgement" in str(caught.value)
    assert f"at seq {newest['seq']} ({newest['ts']})" in str(caught.value)
    gap = guard_start(tmp_path / "audit", anchor, accept_gap=True)
    assert gap is not None and "witness syslog" in gap["problems"][0]
