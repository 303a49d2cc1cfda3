"""The audit log's fsyncs (audit/fsync.py): shared by the records that wait together, never
lost to a cancelled waiter, failing every waiter when the disk fails, safe across rotation."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

from stockade.audit.chain import load_or_create_key, load_public_key, public_path
from stockade.audit.fsync import Fsyncer
from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.audit.verify import audit_files, default_head, verify


def open_log(folder: Path, **options: int) -> tuple[AuditLog, Path]:
    key_path = folder / "pki" / "audit-key.pem"
    log = AuditLog(folder / "audit", load_or_create_key(key_path), daemon_id="test", **options)
    log.open()
    return log, key_path


def verified(folder: Path, key_path: Path) -> int:
    files = audit_files([folder / "audit"])
    result = verify(files, load_public_key(public_path(key_path)), default_head(files))
    assert result.ok, result.problem
    return int(result.records)


def test_durable_records_that_wait_together_share_fsyncs(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], int]:
        log, _ = open_log(tmp_path)
        try:
            seqs = await asyncio.gather(
                *(log.record("request", durable=True, outcome="deny", n=n) for n in range(200))
            )
            return list(seqs), log.fsyncs
        finally:
            await log.close()

    seqs, fsyncs = asyncio.run(scenario())
    assert sorted(seqs) == list(range(1, 201))
    assert 1 <= fsyncs < 50  # one per group, not one per record (a few groups in practice)
    assert verified(tmp_path, tmp_path / "pki" / "audit-key.pem") >= 200


def test_a_cancelled_wait_leaves_the_others_waiting(tmp_path: Path) -> None:
    target = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)

    async def scenario() -> tuple[list[bool], int]:
        fsyncer = Fsyncer(lambda: target)
        try:
            with fsyncer.lock:  # the thread waits here: the asks below share fsyncs
                waits = [fsyncer.fsync() for _ in range(6)]
                for cancelled in waits[1::2]:
                    cancelled.cancel()
            kept = waits[0::2]
            await asyncio.wait_for(asyncio.gather(*kept), 10)
            return [w.cancelled() for w in waits], fsyncer.done
        finally:
            fsyncer.stop()

    try:
        cancelled, fsyncs = asyncio.run(scenario())
    finally:
        os.close(target)
    assert cancelled == [False, True] * 3
    assert 1 <= fsyncs <= 2  # the first ask alone, or with the others; then the rest


def test_a_failed_fsync_fails_every_record_waiting_on_it() -> None:
    unsyncable, other_end = os.pipe()  # an fsync of a pipe fails (EINVAL), as a bad disk's

    async def scenario() -> list[BaseException | None]:
        fsyncer = Fsyncer(lambda: unsyncable)
        try:
            waits = [fsyncer.fsync() for _ in range(3)]
            return list(await asyncio.gather(*waits, return_exceptions=True))
        finally:
            fsyncer.stop()

    try:
        outcomes = asyncio.run(scenario())
    finally:
        os.close(unsyncable)
        os.close(other_end)
    assert all(isinstance(o, OSError) and o.errno == errno.EINVAL for o in outcomes), outcomes


def test_durable_records_across_rotations_verify(tmp_path: Path) -> None:
    async def scenario() -> None:
        log, _ = open_log(tmp_path, max_file_bytes=16 * 1024, checkpoint_records=50)
        try:
            for burst in range(10):  # each burst's fsyncs meet a rotation now and then
                await asyncio.gather(
                    *(
                        log.record("request", durable=True, outcome="deny", burst=burst, n=n)
                        for n in range(60)
                    )
                )
        finally:
            await log.close()

    asyncio.run(scenario())
    assert len(audit_files([tmp_path / "audit"])) > 3, "rotation happened"
    assert verified(tmp_path, tmp_path / "pki" / "audit-key.pem") >= 600


def test_after_close_a_sync_fails_closed(tmp_path: Path) -> None:
    async def scenario() -> BaseException | None:
        fsyncer = Fsyncer(lambda: -1)
        fsyncer.stop()
        try:
            await fsyncer.fsync()
        except OSError as exc:
            return exc
        return None

    failure = asyncio.run(scenario())
    assert isinstance(failure, OSError) and failure.errno == errno.EBADF


def test_a_durable_record_is_not_confirmed_once_the_log_has_failed(tmp_path: Path) -> None:
    """Red-team finding: Linux reports a lost write to one fsync of the file only. When a
    checkpoint (written and fsynced on the event loop's thread) fails while a durable record
    waits for its own fsync, that fsync can succeed: the record must still be refused."""
    audit = tmp_path / "audit"
    audit.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(audit)], check=True)
    try:

        async def scenario() -> tuple[BaseException | None, BaseException | None, str]:
            log, _ = open_log(tmp_path)
            waiting = asyncio.create_task(log.record("request", durable=True, outcome="deny"))
            await asyncio.sleep(0)  # written; its fsync asked for
            filler = os.open(audit / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:  # the disk fills up (a real ENOSPC, not a stand-in)
                    os.write(filler, b"x" * 4096)
            except OSError:
                pass
            finally:
                os.close(filler)
            failed_checkpoint: BaseException | None = None
            try:
                log.checkpoint()
            except AuditUnavailable as exc:
                failed_checkpoint = exc
            refused: BaseException | None = None
            try:
                await asyncio.wait_for(waiting, 10)
            except AuditUnavailable as exc:
                refused = exc
            state = log.state
            await log.close()
            return failed_checkpoint, refused, state

        failed_checkpoint, refused, state = asyncio.run(scenario())
    finally:
        subprocess.run(["umount", str(audit)], check=True)
    assert failed_checkpoint is not None
    assert isinstance(refused, AuditUnavailable), "a record was confirmed by a failed log"
    assert state.startswith("failed: the audit disk is full")
