"""Witnesses: every signed checkpoint also leaves the host, as CT's signed tree heads do.

Kinds (settings `audit_witness_*`):
- `file`: an append-only file, meant to be on another filesystem (opened O_APPEND, one
  checkpoint JSON per line, fsynced); acknowledged once fsynced;
- `syslog`: RFC 5424 messages over TLS with octet-counted framing (RFC 5425) to a
  collector; acknowledged once written to the TLS connection (syslog has no reply);
- `https`: the checkpoint POSTed as application/json; acknowledged by a 2xx answer.

Each witness has its own queue and task. A delivery that fails is retried with backoff
(1 s doubling to 60 s); meanwhile checkpoints queue up to MAX_PENDING (the oldest dropped:
each checkpoint covers all before it). Traffic never waits for a witness. The last
acknowledged checkpoint of each is kept in the anchor folder (`Anchor.acknowledged`), and
`status()` says where each stands. At start, the anchored head is queued again for a
witness that had not acknowledged it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import ssl
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from stockade.audit.anchor import Anchor
from stockade.config import Settings
from stockade.logs import get_logger

log = get_logger("stockade.audit.witness")

MAX_PENDING = 256
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
DELIVERY_TIMEOUT = 10.0
SYSLOG_PRI = 13 * 8 + 5  # facility 13 (log audit), severity 5 (notice)


class Witness(ABC):
    """One place checkpoints go. `deliver` returns once it is acknowledged, or raises."""

    name: str

    @abstractmethod
    async def deliver(self, line: bytes) -> None: ...

    async def close(self) -> None:  # noqa: B027  (most witnesses hold no connection)
        """Drop any connection (it is made again on the next delivery)."""


class FileWitness(Witness):
    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def deliver(self, line: bytes) -> None:
        await asyncio.to_thread(self._append, line)

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line + b"\n")  # one write: O_APPEND keeps it whole
            os.fsync(fd)
        finally:
            os.close(fd)


def syslog_frame(line: bytes, *, hostname: str, pid: int, now: datetime) -> bytes:
    """An RFC 5424 message carrying the checkpoint, octet-counted (RFC 5425 section 4.3)."""
    stamp = now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{SYSLOG_PRI}>1 {stamp} {host} stockaded {pid} checkpoint - ".encode()
    message = header + line
    return str(len(message)).encode() + b" " + message


class SyslogWitness(Witness):
    name = "syslog"

    def __init__(self, address: str, ca_file: Path | None) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._writer: asyncio.StreamWriter | None = None

    async def deliver(self, line: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            _, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._context, server_hostname=self.host
            )
            self._writer.transport.set_write_buffer_limits(0)  # drain: all handed on
        frame = syslog_frame(
            line, hostname=socket.gethostname(), pid=os.getpid(), now=datetime.now(UTC)
        )
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)


class HttpsWitness(Witness):
    name = "https"

    def __init__(self, url: str, ca_file: Path | None) -> None:
        self.url = url
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    async def deliver(self, line: bytes) -> None:
        timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                self.url,
                data=line,
                headers={"Content-Type": "application/json"},
                ssl=self._context,
                allow_redirects=False,
            ) as answer,
        ):
            if not 200 <= answer.status < 300:
                raise OSError(f"HTTP {answer.status}")


class WitnessRunner:
    """Delivers checkpoints to one witness, in order, with retries; a CheckpointObserver."""

    def __init__(self, witness: Witness, anchor: Anchor) -> None:
        self.witness = witness
        self._anchor = anchor
        self._pending: collections.deque[tuple[bytes, dict[str, Any]]] = collections.deque(
            maxlen=MAX_PENDING
        )
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._acked = 0
        self._state = "ok: nothing sent yet"
        self._failures = 0

    def published(self, line: bytes, record: dict[str, Any]) -> None:
        self._pending.append((line, record))
        self._arrived.set()

    def resume(self, line: bytes, record: dict[str, Any], acked: int) -> None:
        """At start: what this witness last acknowledged, and the head it may lack."""
        self._acked = acked
        if int(record["seq"]) > acked:
            self.published(line, record)

    async def run(self) -> None:
        try:
            while True:
                await self._arrived.wait()
                delay: float = await self._deliver_pending()
                if delay:
                    await asyncio.sleep(delay)
        finally:
            await self.witness.close()

    async def flush(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._deliver_pending(), timeout)
        await self.witness.close()

    async def _deliver_pending(self) -> float:
        """Deliver in order; on a failure, the backoff to wait (0 once all are delivered)."""
        async with self._lock:
            while self._pending:
                line, record = self._pending[0]
                try:
                    await asyncio.wait_for(self.witness.deliver(line), DELIVERY_TIMEOUT)
                    self._anchor.acknowledged(self.witness.name, record, line)
                except Exception as exc:  # any failure: a witness never stops, it retries
                    return self._failed(exc)
                self._pending.popleft()
                if self._failures:
                    log.info("audit witness reachable again", witness=self.witness.name)
                self._acked, self._failures = int(record["seq"]), 0
                self._state = "ok"
            self._arrived.clear()
            return 0.0

    def _failed(self, exc: BaseException) -> float:
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (self._failures - 1))
        reason = str(exc) or exc.__class__.__name__
        self._state = (
            f"unreachable: {reason}; {len(self._pending)} checkpoint(s) waiting, "
            f"retrying in {delay:.0f}s"
        )
        if self._failures == 1:
            log.warning("audit witness unreachable", witness=self.witness.name, error=reason)
        return delay

    def status(self) -> list[tuple[str, str, int]]:
        return [(self.witness.name, self._state, self._acked)]


def witnesses_from_settings(settings: Settings, anchor: Anchor) -> list[WitnessRunner]:
    """The configured witnesses, each resumed from its last acknowledgement."""
    witnesses: list[Witness] = []
    if settings.audit_witness_file is not None:
        _warn_if_same_filesystem(settings.audit_witness_file, settings.state_dir)
        witnesses.append(FileWitness(settings.audit_witness_file))
    if settings.audit_witness_syslog:
        witnesses.append(
            SyslogWitness(settings.audit_witness_syslog, settings.audit_witness_syslog_ca)
        )
    if settings.audit_witness_https:
        witnesses.append(
            HttpsWitness(settings.audit_witness_https, settings.audit_witness_https_ca)
        )
    runners = [WitnessRunner(witness, anchor) for witness in witnesses]
    head, acks = anchor.head(), anchor.acknowledgements()
    if head is not None and head.record is not None and "signature" in head.record:
        line = anchor.head_path.read_bytes()
        for runner in runners:
            acked = acks.get(runner.witness.name)
            runner.resume(line, head.record, acked.seq if acked else 0)
    return runners


def _warn_if_same_filesystem(path: Path, state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        if path.parent.stat().st_dev == state_dir.stat().st_dev:
            log.warning(
                "the audit witness file is on the state folder's filesystem: it does not "
                "survive whoever can rewrite that filesystem",
                witness_file=str(path),
            )
