"""The audit trail: chain and signatures verified, tampering caught by line, fail-closed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.audit.chain import load_or_create_key, load_public_key, public_path
from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.audit.verify import audit_files, default_head, verify
from stockade.cli.audit import to_cef
from tests.daemon_helper import Daemon, HostSession, running_daemon

AUDIT_UNAVAILABLE = -32030


def stockade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "stockade"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_log(folder: Path, events: int, **options: Any) -> Path:
    """A real audit log of `events` records (plus checkpoints); returns the key path."""
    key_path = folder / "pki" / "audit-key.pem"
    key = load_or_create_key(key_path)

    async def scenario() -> None:
        log = AuditLog(folder / "audit", key, daemon_id="test", **options)
        log.open()
        for n in range(events):
            outcome = "deny" if n % 7 == 0 else "allow"
            await log.record(
                "request",
                durable=outcome == "deny",
                outcome=outcome,
                identity=f"spiffe://stockade.local/host/h{n % 3}",
                server="time",
                action="tools/call",
                target="get_current_time",
            )
        await log.close()

    asyncio.run(scenario())
    return key_path


def check(folder: Path, key_path: Path) -> Any:
    files = audit_files([folder / "audit"])
    return verify(files, load_public_key(public_path(key_path)), default_head(files))


def test_a_long_run_across_rotations_verifies(tmp_path: Path) -> None:
    key = write_log(tmp_path, 3000, max_file_bytes=64 * 1024, checkpoint_records=250)
    files = audit_files([tmp_path / "audit"])
    assert len(files) > 5, "rotation by size happened"
    result = check(tmp_path, key)
    assert result.ok, result.problem
    assert result.records > 3000
    assert result.checkpoints > 12
    assert result.unsigned_tail == 0  # close() signs the tail
    cli = stockade(
        "audit", "verify", "--dir", str(tmp_path / "audit"), "--key", str(public_path(key))
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.startswith("OK: ")


@pytest.fixture
def small_log(tmp_path: Path) -> Iterator[tuple[Path, Path, list[bytes]]]:
    key = write_log(tmp_path, 40, checkpoint_records=10)
    path = audit_files([tmp_path / "audit"])[0]
    yield tmp_path, key, path.read_bytes().splitlines(keepends=True)


def _tamper(lines: list[bytes], how: str) -> tuple[list[bytes], int]:  # noqa: PLR0911
    """The tampered lines, and the (1-based) line verify must name."""
    lines = list(lines)
    if how == "flip a byte":
        line = bytearray(lines[11])
        line[line.index(b"h1") + 1] ^= 0x01  # h1 -> h0 in an identity
        lines[11] = bytes(line)
        return lines, 12
    if how == "delete a line":
        del lines[20]
        return lines, 21
    if how == "insert a line":
        lines.insert(5, lines[4])
        return lines, 6
    if how == "swap two lines":
        lines[30], lines[31] = lines[31], lines[30]
        return lines, 31
    if how == "cut mid-line":
        lines[-1] = lines[-1][:20]
        return lines, len(lines)
    if how == "cut whole lines":
        return lines[:25], 25
    if how == "edit the last line":  # a checkpoint: its signature covers every field
        lines[-1] = lines[-1].replace(b'"ts":"2', b'"ts":"1')
        return lines, len(lines)
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "flip a byte",
        "delete a line",
        "insert a line",
        "swap two lines",
        "cut mid-line",
        "cut whole lines",
        "edit the last line",
    ],
)
def test_tampering_is_caught_and_the_line_named(
    small_log: tuple[Path, Path, list[bytes]], how: str
) -> None:
    folder, key, lines = small_log
    path = audit_files([folder / "audit"])[0]
    assert check(folder, key).ok  # the control: untouched, it verifies
    tampered, line = _tamper(lines, how)
    path.write_bytes(b"".join(tampered))
    result = check(folder, key)
    assert not result.ok
    assert result.problem.startswith(f"{path}:{line}: "), result.problem
    cli = stockade(
        "audit", "verify", "--dir", str(folder / "audit"), "--key", str(public_path(key))
    )
    assert cli.returncode == 2
    assert f"FAILED: {path}:{line}: " in cli.stdout
    if how == "cut whole lines":
        assert "records were removed from the end" in result.problem


def test_a_forged_checkpoint_is_caught(small_log: tuple[Path, Path, list[bytes]]) -> None:
    folder, key, lines = small_log
    path = audit_files([folder / "audit"])[0]
    number, record = next(
        (n, json.loads(line)) for n, line in enumerate(lines) if b"audit.checkpoint" in line
    )
    record["signature"] = record["signature"][:-4] + "AAA="
    lines[number] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    result = check(folder, key)
    assert not result.ok
    assert result.problem.startswith(f"{path}:{number + 1}: checkpoint signature")


def test_a_torn_last_line_is_cut_and_recorded(tmp_path: Path) -> None:
    key_path = write_log(tmp_path, 12, checkpoint_records=5)
    path = audit_files([tmp_path / "audit"])[0]
    with path.open("ab") as handle:
        handle.write(b'{"seq":99,"half a rec')  # a crash mid-write: never acknowledged

    async def reopen() -> None:
        log = AuditLog(tmp_path / "audit", load_or_create_key(key_path), daemon_id="test")
        log.open()
        await log.close()

    asyncio.run(reopen())
    result = check(tmp_path, key_path)
    assert result.ok, result.problem
    torn = [json.loads(line) for line in path.read_text().splitlines() if "torn_tail" in line]
    assert torn[0]["detail"]["length"] == len(b'{"seq":99,"half a rec')


def test_a_full_disk_fails_closed(tmp_path: Path) -> None:
    audit = tmp_path / "state" / "audit"
    audit.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(audit)], check=True)
    try:
        key = load_or_create_key(tmp_path / "state" / "pki" / "audit-key.pem")

        async def scenario() -> tuple[int, str]:
            log = AuditLog(audit, key, daemon_id="test", checkpoint_records=10_000)
            log.open()
            written = 0
            with pytest.raises(AuditUnavailable, match="No space left on device"):
                while True:
                    await log.record("request", durable=True, outcome="deny", reason="x" * 200)
                    written += 1
            with pytest.raises(AuditUnavailable):  # and it stays failed
                await log.record("request", outcome="allow")
            state = log.state
            await log.close()
            return written, state

        written, state = asyncio.run(scenario())
        assert state.startswith("failed: the audit disk is full")
        complete = [line for line in (audit / "audit-000001.jsonl").read_bytes().split(b"\n")[:-1]]
        assert len(complete) >= written  # everything acknowledged is there, whole
    finally:
        subprocess.run(["umount", str(audit)], check=True)


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_a_daemon_with_a_full_audit_disk_refuses_requests(tmp_path: Path) -> None:
    audit = tmp_path / "state" / "audit"
    audit.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(audit)], check=True)
    try:
        # No reserve: this test is about the disk really filling up (ENOSPC on a write).
        with running_daemon(tmp_path, STOCKADE_AUDIT_RESERVE_BYTES="0") as daemon:
            daemon.add_scratch_server("scratch", "--warm", "1")
            answers = asyncio.run(_echo_until_refused(daemon))
            status = daemon.cli("status").stdout
            acknowledged = [a for a in answers if "result" in a]
            refused = answers[-1]
            assert refused["error"]["code"] == AUDIT_UNAVAILABLE
            assert "the audit disk is full" in refused["error"]["message"]
            assert "audit: failed: the audit disk is full" in status
            records = [
                json.loads(line)
                for path in sorted(audit.glob("audit-*.jsonl"))
                for line in path.read_bytes().split(b"\n")[:-1]
            ]
            allowed = [
                r
                for r in records
                if r["type"] == "request"
                and r["outcome"] == "allow"
                and r["action"] == "scratch/echo"
            ]
            assert len(allowed) >= len(acknowledged)  # nothing acknowledged went unrecorded
    finally:
        subprocess.run(["umount", str(audit)], check=True)


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_the_audit_warns_refuses_and_resumes_by_itself_as_the_disk_fills_and_empties(
    tmp_path: Path,
) -> None:
    audit = tmp_path / "state" / "audit"
    audit.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(audit)], check=True)
    filler = audit / "filler"
    try:
        with running_daemon(
            tmp_path,
            STOCKADE_AUDIT_RESERVE_BYTES=str(1024 * 1024),
            STOCKADE_AUDIT_WARN_FREE_BYTES=str(2 * 1024 * 1024),
        ) as daemon:
            daemon.add_scratch_server("scratch", "--warm", "1")

            def fill_to(free: int) -> None:
                stats = os.statvfs(audit)
                extra = stats.f_bavail * stats.f_frsize - free
                with filler.open("ab") as handle:
                    handle.write(b"\0" * max(0, extra))

            async def scenario() -> tuple[str, dict[str, Any], str, dict[str, Any]]:
                async with HostSession(daemon, "scratch") as host:
                    fill_to(int(1.5 * 1024 * 1024))
                    await host.request("scratch/echo", {"n": 1})
                    await asyncio.sleep(0.6)  # the next free-space reading is due
                    await host.request("scratch/echo", {"n": 2})
                    warned = (await asyncio.to_thread(daemon.cli, "status")).stdout
                    fill_to(512 * 1024)
                    await asyncio.sleep(0.6)
                    refused = await host.request("scratch/echo", {"n": 3})
                    failed = (await asyncio.to_thread(daemon.cli, "status")).stdout
                    filler.unlink()  # space is back
                    for n in range(60):
                        await asyncio.sleep(0.5)
                        again = await host.request("scratch/echo", {"n": 4 + n})
                        if "result" in again:
                            break
                    return warned, refused, failed, again

            warned, refused, failed, again = asyncio.run(scenario())
            assert "warning: only" in warned and "MiB free on the audit disk" in warned
            assert refused["error"]["code"] == AUDIT_UNAVAILABLE
            assert "nearly full" in refused["error"]["message"]
            assert "audit: failed: the audit disk is nearly full" in failed
            assert "result" in again  # resumed by itself, no restart
            records = [
                json.loads(line)
                for path in sorted(audit.glob("audit-*.jsonl"))
                for line in path.read_bytes().split(b"\n")[:-1]
            ]
            resumed = [r for r in records if r["type"] == "audit.resumed"]
            assert resumed and "nearly full" in resumed[0]["reason"]
            key = str(daemon.state_dir / "pki" / "audit-key.pub")
            verified = daemon.cli("audit", "verify", "--dir", str(audit), "--key", key)
            assert verified.stdout.startswith("OK:"), verified.stdout  # one unbroken chain
    finally:
        subprocess.run(["umount", str(audit)], check=True)


async def _echo_until_refused(daemon: Daemon) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    async with HostSession(daemon, "scratch") as host:
        for n in range(2000):
            answer = await host.request("scratch/echo", {"n": n, "pad": "p" * 100})
            answers.append(answer)
            if "error" in answer:
                break
    return answers


def test_cef_export_escapes_and_names_fields() -> None:
    line = to_cef(
        {
            "seq": 7,
            "ts": "2026-11-24T10:00:00.000Z",
            "type": "request",
            "outcome": "deny",
            "identity": "spiffe://x/host/a",
            "server": "time",
            "action": "tools/call",
            "rule": "r=1|x",
            "reason": "a\nb",
        }
    )
    assert line.startswith("CEF:0|Stockade|stockaded|1|request|request deny|7|")
    assert "suser=spiffe://x/host/a" in line
    assert "cs1=r\\=1|x" in line
    assert "reason=a\\nb" in line
