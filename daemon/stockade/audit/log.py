"""The audit log writer: append-only, hash-chained, signed at checkpoints, fail-closed.

Durability: `record(..., durable=True)` (denials, admin actions) returns only after the
record is fsynced. Other records are written at once and fsynced in groups, at most
`fsync_interval` later. If a write or fsync fails (disk full, permissions), the log is
*failed*: every later `record` raises AuditUnavailable, callers refuse what they were about
to do, and `state` says why. It stays failed until the daemon restarts (a half-written line
cannot be trusted to be whole).

On open, a torn last line (a crash mid-write: it was never acknowledged) is cut off, and the
cut is itself recorded (`audit.torn_tail`, with the removed bytes' length and hash).

Each checkpoint is fsynced before it is published: to `head.json`, then to the observers
(the anchor copy outside the audit folder, the witnesses), so no copy is ever ahead of the
log on disk. `checkpoint_fields` are carried in every checkpoint (the secret store's
generation), so the newest signed head vouches for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.atomic import write_atomically
from stockade.audit.chain import (
    CHECKPOINT,
    FILE_PATTERN,
    GENESIS,
    HEAD_FILE,
    canonical,
    file_name,
    fingerprint,
    line_hash,
    sign,
)
from stockade.audit.fsync import Fsyncer
from stockade.audit.headroom import Headroom
from stockade.logs import get_logger
from stockade.metrics import AUDIT_FSYNC, AUDIT_WRITE

log = get_logger("stockade.audit")


class CheckpointObserver(Protocol):
    """Told of every checkpoint once the log holds it on disk (the anchor, the witnesses)."""

    def published(self, line: bytes, record: dict[str, Any]) -> None:
        """Called in the event loop; may raise OSError (the log then fails closed)."""

    async def run(self) -> None:
        """Background work (deliveries, retries) while the log runs."""

    async def flush(self, timeout: float) -> None:
        """At close: a last chance to deliver, bounded by `timeout`."""

    def status(self) -> list[tuple[str, str, int]]:
        """(name, state, last acknowledged seq) per witness."""


class AuditStartError(Exception):
    """The audit log cannot be opened at start: the daemon does not run without one."""


class AuditUnavailable(Exception):
    """The audit log cannot be written; the action that needed a record must not happen."""


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def utc_now() -> str:
    """The time now, to the millisecond (`2026-12-02T05:21:51.350Z`); the date and time of
    day are formatted once a second, as records come in runs."""
    global _second  # noqa: PLW0603 - a one-entry cache
    seconds, millis = divmod(time.time_ns() // 1_000_000, 1000)
    if seconds != _second[0]:
        _second = (seconds, datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{millis:03d}Z"


def _last_line(path: Path) -> tuple[bytes, int]:
    """(the last complete line, the length of a torn tail after it, 0 if none)."""
    data = path.read_bytes()
    if not data:
        return b"", 0
    end = data.rfind(b"\n")
    torn = len(data) - (end + 1)
    start = data.rfind(b"\n", 0, end) + 1 if end >= 0 else 0
    return (data[start:end] if end >= 0 else b""), torn


class AuditLog:
    def __init__(
        self,
        directory: Path,
        key: Ed25519PrivateKey,
        *,
        daemon_id: str,
        fsync_interval: float = 0.01,
        checkpoint_records: int = 1000,
        checkpoint_seconds: float = 10.0,
        max_file_bytes: int = 64 * 1024 * 1024,
        observers: Sequence[CheckpointObserver] = (),
        headroom: Headroom | None = None,
    ) -> None:
        self._headroom = headroom or Headroom()
        # A failure that goes away by itself (the disk filled up): resumed, not fatal.
        self._recoverable = False
        self._failed_at = 0.0
        self.directory = directory
        self._key = key
        self._observers = list(observers)
        self._thread = threading.get_ident()  # set again by `open`: the writing thread
        self.checkpoint_fields: dict[str, Any] = {}
        self.key_fingerprint = fingerprint(key.public_key())
        self._daemon_id = daemon_id
        self._fsync_interval = fsync_interval
        self._checkpoint_records = checkpoint_records
        self._checkpoint_seconds = checkpoint_seconds
        self._max_file_bytes = max_file_bytes
        self._fd = -1
        self._index = 0
        self._size = 0
        self._seq = 0
        self._prev = GENESIS
        self._unsigned = 0
        self._last_checkpoint = time.monotonic()
        self._dirty = asyncio.Event()
        self._failure: str | None = None
        self._fsyncer = Fsyncer(lambda: self._fd)

    # -- state ----------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def state(self) -> str:
        if self._failure is not None:
            return f"failed: {self._failure}"
        warning = self._headroom.warning()
        return "ok" if warning is None else f"ok (warning: {warning})"

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def fsyncs(self) -> int:
        """fsyncs made by the group commit thread (many records' waits may share one)."""
        return self._fsyncer.done

    # -- open / close -----------------------------------------------------------------

    def witness_states(self) -> list[tuple[str, str, int]]:
        return [state for observer in self._observers for state in observer.status()]

    def open(self, first: tuple[str, dict[str, Any]] | None = None) -> None:
        """Continue the chain from the newest file (or start it). Raises OSError.

        `first`, if given, is written before anything else (an accepted gap)."""
        self._thread = threading.get_ident()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = sorted(self.directory.glob(FILE_PATTERN))
        torn_bytes = b""
        if files:
            current = files[-1]
            self._index = int(current.stem.split("-")[1])
            last, torn = _last_line(current)
            if torn:
                size = current.stat().st_size
                with current.open("rb") as handle:
                    handle.seek(size - torn)
                    torn_bytes = handle.read()
                os.truncate(current, size - torn)
            if last:
                record = json.loads(last)
                self._seq, self._prev = int(record["seq"]), line_hash(last)
            elif len(files) > 1:  # an empty newest file: the chain ends in the one before
                previous, _ = _last_line(files[-2])
                if previous:
                    record = json.loads(previous)
                    self._seq, self._prev = int(record["seq"]), line_hash(previous)
        else:
            self._index = 1
        self._open_file()
        if first is not None:
            self.write(first[0], outcome="accepted", detail=first[1])
        if torn_bytes:
            log.warning("audit log had a torn last line; cut off", length=len(torn_bytes))
            self.write(
                "audit.torn_tail",
                detail={"length": len(torn_bytes), "sha256": line_hash(torn_bytes)},
            )

    def _open_file(self) -> None:
        path = self.directory / file_name(self._index)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new file's name is durable too
        finally:
            os.close(directory)

    async def close(self) -> None:
        """Sign what is unsigned, flush, close. Safe to call on a failed log."""
        if self._fd < 0:
            return
        if self._failure is None and self._unsigned:
            with contextlib.suppress(AuditUnavailable):
                self.checkpoint()
        for observer in self._observers:
            await observer.flush(2.0)
        self._fsyncer.stop()
        with self._fsyncer.lock:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    # -- writing ------------------------------------------------------------------------

    def write(self, event_type: str, **fields: Any) -> int:
        """Append one record now (not yet fsynced); return its seq."""
        if self._failure is not None:
            raise AuditUnavailable(self._failure)
        shortfall = self._headroom.shortfall(self._fd)
        if shortfall is not None:
            raise self._fail_recoverably(shortfall)
        if self._size >= self._max_file_bytes and event_type != CHECKPOINT:
            self._rotate()
        began = time.perf_counter()
        seq = self._emit(self._build(event_type, fields))
        AUDIT_WRITE.observe(time.perf_counter() - began)
        return seq

    def _build(self, event_type: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "seq": self._seq + 1,
            "prev": self._prev,
            "ts": utc_now(),
            "daemon": self._daemon_id,
            "type": event_type,
            **{k: v for k, v in fields.items() if v is not None},
        }

    def _emit(self, record: dict[str, Any]) -> int:
        if self._failure is not None:
            raise AuditUnavailable(self._failure)
        if threading.get_ident() != self._thread:  # the chain is one sequence, one writer
            raise RuntimeError("audit records are written from the thread that opened the log")
        event_type = record["type"]
        line = canonical(record)
        self._append(line + b"\n")
        self._seq += 1
        self._prev = line_hash(line)
        self._unsigned = 0 if event_type == CHECKPOINT else self._unsigned + 1
        self._dirty.set()
        if self._unsigned >= self._checkpoint_records:
            self.checkpoint()
        return self._seq

    async def record(self, event_type: str, *, durable: bool = False, **fields: Any) -> int:
        """Append one record; with `durable`, return only once it is on disk."""
        seq = self.write(event_type, **fields)
        if durable:
            await self.sync()
        return seq

    async def sync(self) -> None:
        if self._failure is not None:
            raise AuditUnavailable(self._failure)
        self._dirty.clear()
        began = time.perf_counter()
        try:
            await self._fsyncer.fsync()  # with others asking now: one fsync for all
        except OSError as exc:
            raise self._fail(exc) from None
        # Linux reports a lost write-back to one fsync of the file only: if another (a
        # checkpoint's, on this thread) took it while we waited, ours says nothing.
        if self._failure is not None:
            raise AuditUnavailable(self._failure)
        AUDIT_FSYNC.observe(time.perf_counter() - began)

    def checkpoint(self) -> int:
        """Sign the chain so far (a checkpoint record) and publish it as the signed head."""
        fields = {**self.checkpoint_fields, "file": file_name(self._index)}
        record = self._build(CHECKPOINT, fields)
        record["signature"] = sign(self._key, record)
        seq = self._emit(record)
        line = canonical(record)  # the newest checkpoint, whole: a verifier checks the log has it
        try:
            os.fsync(self._fd)  # on disk before any copy of it is
            write_atomically(self.directory / HEAD_FILE, line)
            for observer in self._observers:
                observer.published(line, record)
        except OSError as exc:
            raise self._fail(exc) from None
        self._last_checkpoint = time.monotonic()
        return seq

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise self._fail(exc) from None
        self._size += len(data)

    def _rotate(self) -> None:
        self.checkpoint()
        try:
            with self._fsyncer.lock:  # never swapped under an fsync in progress
                os.fsync(self._fd)
                os.close(self._fd)
                self._index += 1
                self._open_file()
        except OSError as exc:
            raise self._fail(exc) from None
        log.info("audit log rotated", file=file_name(self._index))

    def _fail(self, exc: OSError) -> AuditUnavailable:
        if exc.errno == errno.ENOSPC and self._failure is None:  # a write, never an fsync
            return self._fail_recoverably(f"the audit disk is full: {exc.strerror}")
        if self._failure is None:
            self._failure = f"cannot write the audit log in {self.directory}: {exc.strerror}"
            log.error("audit log failed: refusing requests until restart", error=self._failure)
        return AuditUnavailable(self._failure)

    def _fail_recoverably(self, reason: str) -> AuditUnavailable:
        self._failure = reason
        self._recoverable = True
        self._failed_at = time.monotonic()
        log.error("audit log refusing records until space returns", error=reason)
        return AuditUnavailable(reason)

    async def _resume_when_space_returns(self) -> bool:
        """Wait for free space above the reserve, cut a torn write, go on; False: fatal."""
        while self._recoverable:
            await asyncio.sleep(1.0)
            try:
                if self._headroom.read(self._fd) < max(self._headroom.reserve_bytes, 1):
                    continue
                os.ftruncate(self._fd, self._size)  # a write cut short by ENOSPC
            except OSError:
                continue
            down = time.monotonic() - self._failed_at
            reason, self._failure, self._recoverable = self._failure, None, False
            log.warning("audit log resumed: space is back", was=reason)
            try:
                self.write("audit.resumed", outcome="ok", reason=reason, seconds=round(down, 1))
                self.checkpoint()
                await self.sync()
            except AuditUnavailable:
                continue
            return True
        return False

    # -- background -------------------------------------------------------------------

    async def run(self) -> None:
        """Group commit (fsync at most every `fsync_interval`) and timed checkpoints."""
        helpers = [asyncio.create_task(observer.run()) for observer in self._observers]
        try:
            await self._run()
        finally:
            for helper in helpers:
                helper.cancel()

    async def _run(self) -> None:
        while True:
            await self._commit_until_failure()
            if not await self._resume_when_space_returns():
                return

    async def _commit_until_failure(self) -> None:
        while self._failure is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._checkpoint_seconds):  # no task, as wait_for
                    await self._dirty.wait()
            await asyncio.sleep(self._fsync_interval)
            try:
                if self._unsigned and (
                    time.monotonic() - self._last_checkpoint >= self._checkpoint_seconds
                ):
                    self.checkpoint()
                if self._dirty.is_set():
                    await self.sync()
            except AuditUnavailable:
                return
