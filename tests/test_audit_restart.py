"""Issue 15: the real daemon refuses to write on a rolled-back log or an older secret store.

Each test plays an attacker who can write the audit folder or restore `secrets.json` from
an old copy (but holds no key), then restarts the daemon, and shows it stops with one line
and exit 78 unless the operator accepts the gap, which is then the first record written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from stockade.audit.verify import audit_files
from tests.daemon_helper import BIN, Daemon
from tests.test_secrets import _secret_cli

EXIT_AUDIT_ROLLBACK = 78


def _records(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in audit_files([daemon.state_dir / "audit"])
        for line in path.read_bytes().splitlines()
    ]


def _start_refused(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """Run stockaded expecting it to stop at start (it must not serve)."""
    return subprocess.run(
        [str(BIN / "stockaded")], env=daemon.env, capture_output=True, text=True, timeout=60
    )


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    text = (result.stdout + result.stderr).splitlines()
    lines = [json.loads(line) for line in text if line.startswith("{")]
    return [line for line in lines if line.get("level") == "error"]


def test_a_rollback_then_restart_is_refused_until_the_gap_is_accepted(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    for _ in range(2):  # two runs: the first run's checkpoints are an older signed history
        daemon.start()
        daemon.cli("cert", "ls")
        assert daemon.stop() == 0
    path = audit_files([daemon.state_dir / "audit"])[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    checkpoints = [n for n, line in enumerate(lines) if b'"audit.checkpoint"' in line]
    cut = checkpoints[0]
    newest = json.loads(lines[checkpoints[-1]])
    path.write_bytes(b"".join(lines[: cut + 1]))  # the rollback: cut after an old checkpoint
    (daemon.state_dir / "audit" / "head.json").write_bytes(lines[cut].rstrip(b"\n"))

    refused = _start_refused(daemon)
    assert refused.returncode == EXIT_AUDIT_ROLLBACK, refused.stdout + refused.stderr
    [error] = _error_lines(refused)
    assert error["event"] == "the audit log was rolled back"
    assert "behind the daemon's head copy" in error["error"]
    assert f"at seq {newest['seq']} ({newest['ts']})" in error["error"]
    assert path.read_bytes() == b"".join(lines[: cut + 1])  # nothing was written on it

    daemon.args = ["--accept-audit-gap"]
    daemon.start()
    try:
        first = _records(daemon)[cut + 1]
        assert first["type"] == "audit.gap_accepted"
        assert first["seq"] == json.loads(lines[cut])["seq"] + 1
        assert "behind the daemon's head copy" in first["detail"]["problems"][0]
        status = json.loads(daemon.cli("status", "--json").stdout)
        text = daemon.log_path.read_text().splitlines()
        logged = [json.loads(line) for line in text if line.startswith("{")]
        [made] = [e for e in logged if e.get("event", "").startswith("audit key made")]
        assert made["fingerprint"] == status["audit_key_fingerprint"]  # logged at first start
    finally:
        assert daemon.stop() == 0
    daemon.args = []
    daemon.start()  # re-anchored: the next start is clean
    assert daemon.stop() == 0


def test_a_restored_older_secret_store_is_refused(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.start()
    try:
        assert _secret_cli(daemon, "set", "api-token", value=b"old-value").returncode == 0
        old_copy = tmp_path / "secrets.json.bak"
        shutil.copy(daemon.state_dir / "secrets.json", old_copy)  # a backup the attacker keeps
        assert _secret_cli(daemon, "rotate", "api-token", value=b"new-value").returncode == 0
        assert _secret_cli(daemon, "set", "gone", value=b"x").returncode == 0
        assert _secret_cli(daemon, "rm", "gone").returncode == 0
    finally:
        assert daemon.stop() == 0
    changes = [r for r in _records(daemon) if r["type"] == "secret.change"]
    assert [(r["action"], r["detail"]["generation"]) for r in changes] == [
        ("set", 1),
        ("rotate", 2),
        ("set", 3),
        ("rm", 4),
    ]
    shutil.copy(old_copy, daemon.state_dir / "secrets.json")  # the rollback

    refused = _start_refused(daemon)
    assert refused.returncode == EXIT_AUDIT_ROLLBACK, refused.stdout + refused.stderr
    [error] = _error_lines(refused)
    assert error["event"] == "cannot open the secret store"
    assert "is at generation 1 but the audit trail records generation 4" in error["error"]
    [denial] = [r for r in _records(daemon) if r["type"] == "secret.store_refused"]
    assert denial["outcome"] == "deny" and denial["reason"] == error["error"]

    (daemon.state_dir / "secrets.json").unlink()  # deleting it is no way round either
    assert "is missing" in _error_lines(_start_refused(daemon))[0]["error"]
