"""One running sandbox container of a server, with its stdio.

An instance is started and attached before anyone talks to it (so it can wait in the warm
pool). Its stdout lines are held back, which exerts backpressure on the container, until a
consumer is bound. Its stderr goes to a bounded ring and to log lines. When its output ends,
the instance learns from the engine how the container ended (exit code, OOM kill, pids-limit
hits) and resolves `exited`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from stockade.logs import get_logger, log_context
from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.errors import EXIT_MEANINGS, ContainerGone
from stockade.sandbox.http_channel import HttpChannel, HttpTarget
from stockade.sandbox.pace import YIELD_EVERY, OutputLimits
from stockade.sandbox.runtime import ExitStatus, SandboxRuntime
from stockade.sandbox.spec import ContainerSpec
from stockade.sandbox.stdio_pipes import PipedStdio
from stockade.secrets.redact import Redactor, StreamRedactor
from stockade.wire.lines import OversizedLine

log = get_logger("stockade.instance")
REDACT_OFF_LOOP_BYTES = 64 * 1024

STDERR_RING_LINES = 1000
STDERR_LINE_CHARS = 4096  # a longer stderr line is cut in the ring: the ring stays bounded
# The daemon's own log gets a sample of a server's stderr: at most this many lines a second
# per instance (the ring, served by `stockade server logs`, keeps them all).
STDERR_LOG_PER_SECOND = 5
# Every call to the engine that a stop depends on has a deadline: a stuck engine (or a stuck
# attach stream) must never keep a container, a session or the daemon's shutdown waiting.
ENGINE_DEADLINE = 30.0
LineSink = Callable[[bytes | OversizedLine], Awaitable[None]]


class StderrLog:
    """The last `STDERR_RING_LINES` stderr lines of an instance, numbered for `--follow`."""

    def __init__(self) -> None:
        self._lines: deque[str] = deque(maxlen=STDERR_RING_LINES)
        self.total = 0  # lines ever appended

    def append(self, line: str) -> None:
        if len(line) > STDERR_LINE_CHARS:
            line = f"{line[:STDERR_LINE_CHARS]}…[{len(line) - STDERR_LINE_CHARS} more characters]"
        self._lines.append(line)
        self.total += 1

    def since(self, seen: int) -> list[str]:
        """Lines appended after the first `seen` (those still in the ring)."""
        fresh = min(self.total - seen, len(self._lines))
        return list(self._lines)[len(self._lines) - fresh :] if fresh > 0 else []


class _StderrSample:
    """At most STDERR_LOG_PER_SECOND lines a second to the daemon log; the rest counted."""

    def __init__(self) -> None:
        self._second = 0
        self._said = 0
        self._unsaid = 0

    def take(self) -> int | None:
        """The lines not logged since the last one that was, or None: do not log this one."""
        now = int(time.monotonic())
        if now != self._second:
            self._second, self._said = now, 0
        if self._said >= STDERR_LOG_PER_SECOND:
            self._unsaid += 1
            return None
        self._said += 1
        unsaid, self._unsaid = self._unsaid, 0
        return unsaid


def new_instance_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class ExitReport:
    """How an instance ended, as shown to operators and in JSON-RPC errors."""

    exit_code: int
    oom_killed: bool
    pids_limit_hits: int
    stopped_by_daemon: bool

    def describe(self) -> str:
        text = f"exited with code {self.exit_code}"
        meaning = EXIT_MEANINGS.get(self.exit_code)
        if meaning and not self.oom_killed:
            text += f" ({meaning})"
        if self.oom_killed:
            text += " (killed: out of memory)"
        if self.pids_limit_hits:
            text += f" (hit its pids limit {self.pids_limit_hits} times)"
        return text


@dataclass
class Redaction:
    """A redactor for an instance's output, and who to tell (names only) when it acts."""

    redactor: Redactor
    on_redacted: Callable[[list[str]], None]

    def apply(self, line: bytes) -> bytes:
        line, found = self.redactor.apply(line)
        if found:
            self.on_redacted(found)
        return line

    async def apply_off_loop(self, line: bytes) -> bytes:
        """`apply`, in a worker thread for a long line: reading a line full of escapes is
        Python work per escape, and the server chooses its lines."""
        if len(line) < REDACT_OFF_LOOP_BYTES:
            return self.apply(line)
        line, found = await asyncio.to_thread(self.redactor.apply, line)
        if found:
            self.on_redacted(found)
        return line


@dataclass
class Instance:
    """A started, attached container. Create with `Instance.start`."""

    id: str
    server: str
    container_id: str
    stdio: AttachedStdio | PipedStdio
    backend: SandboxRuntime
    started_at: float = field(default_factory=time.monotonic)
    stderr: StderrLog = field(default_factory=StderrLog)
    session_id: str | None = None
    sandbox_fingerprint: str = ""  # what it was built from; a pool hands out only current ones
    granted_secrets: tuple[str, ...] = ()  # names only, for audit records
    exited: asyncio.Future[ExitReport] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # Set at its first message or its end: its server has started (the start gate's signal).
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    _sink: LineSink | None = None
    _sink_bound: asyncio.Event = field(default_factory=asyncio.Event)
    pids_limit_hits: int = 0  # last sample; the cgroup disappears with the container
    redaction: Redaction | None = None  # granted secrets, replaced in everything it says
    _reader: asyncio.Task[None] | None = None
    _stopping: bool = False
    # Servers that speak streamable HTTP: messages go over `http`; the container's
    # stdout is then only log lines, drained by `_drain`.
    http: HttpChannel | None = None
    _drain: asyncio.Task[None] | None = None
    _log_line: Callable[[bytes], None] | None = None

    @classmethod
    async def start(
        cls,
        backend: SandboxRuntime,
        spec: ContainerSpec,
        server: str,
        instance_id: str,
        max_line_bytes: int,
        *,
        redaction: Redaction | None = None,
        http: HttpTarget | None = None,
        limits: OutputLimits | None = None,
        pipes: Path | None = None,
    ) -> Instance:
        """Create, attach (before start, or early output is lost), then start. With `pipes`
        (a folder of `sandbox/stdio_pipes.py`, `spec` made by its `piped`), stdin and stdout
        go through those pipes instead of the attach socket."""
        container_id = await asyncio.to_thread(backend.create, spec)
        instance: Instance | None = None
        try:
            instance = await cls._attach(
                backend,
                container_id,
                server,
                instance_id,
                max_line_bytes,
                redaction=redaction,
                http_mode=http is not None,
                limits=limits,
                pipes=pipes,
            )
            await asyncio.to_thread(backend.start, container_id)
            if http is not None:
                address = await asyncio.to_thread(backend.address_on, container_id, http.network)
                instance.http = HttpChannel(http.url(address), max_line_bytes)
                instance._reader = asyncio.create_task(
                    instance._read(), name=f"reader-{instance_id}"
                )
        except BaseException:
            if instance is not None:
                for task in (instance._reader, instance._drain):
                    if task is not None:
                        task.cancel()
                if instance.http is not None:
                    await instance.http.close()
                with contextlib.suppress(Exception):  # its sockets and pipes, not left open
                    await instance.stdio.close()
            await asyncio.to_thread(backend.stop, container_id, 0)
            raise
        return instance

    @classmethod
    async def adopt(
        cls,
        backend: SandboxRuntime,
        container_id: str,
        server: str,
        instance_id: str,
        max_line_bytes: int,
        *,
        redaction: Redaction | None = None,
        limits: OutputLimits | None = None,
    ) -> Instance:
        """Attach again to a running container a previous daemon run started."""
        return await cls._attach(
            backend,
            container_id,
            server,
            instance_id,
            max_line_bytes,
            redaction=redaction,
            limits=limits,
        )

    @classmethod
    async def _attach(
        cls,
        backend: SandboxRuntime,
        container_id: str,
        server: str,
        instance_id: str,
        max_line_bytes: int,
        *,
        redaction: Redaction | None = None,
        http_mode: bool = False,
        limits: OutputLimits | None = None,
        pipes: Path | None = None,
    ) -> Instance:
        attachment = await asyncio.to_thread(backend.attach, container_id)
        stderr = StderrLog()

        sample = _StderrSample()

        def on_stderr(line: bytes) -> None:  # already redacted, as a stream (multi-line values)
            text = line.decode("utf-8", errors="replace")
            stderr.append(text)
            unsaid = sample.take()
            if unsaid is not None:
                with log_context(server=server, instance=instance_id):
                    log.info("server stderr", line=text[:STDERR_LINE_CHARS], not_logged=unsaid)

        redact = None
        if redaction is not None:
            redact = StreamRedactor(redaction.redactor, redaction.on_redacted).feed
        attached = await AttachedStdio.open(
            attachment, max_line_bytes, on_stderr, stderr_filter=redact, limits=limits
        )
        stdio: AttachedStdio | PipedStdio = attached
        if pipes is not None:
            try:
                stdio = await PipedStdio.open(attached, pipes, max_line_bytes)
            except BaseException:
                await attached.close()
                raise
        instance = cls(
            id=instance_id,
            server=server,
            container_id=container_id,
            stdio=stdio,
            backend=backend,
            stderr=stderr,
            redaction=redaction,
        )
        instance._log_line = on_stderr
        if http_mode:
            instance._drain = asyncio.create_task(instance._drain_output())
        else:
            instance._reader = asyncio.create_task(instance._read(), name=f"reader-{instance_id}")
        return instance

    async def _drain_output(self) -> None:
        """HTTP servers: stdout is log lines; its end (the container's) ends the channel."""
        try:
            source = self.http.lines() if self.http is not None else self.stdio.lines()
            async for line in source:
                if isinstance(line, bytes) and self._log_line is not None:
                    self._log_line(line)
        except (OSError, ConnectionError) as exc:
            log.warning("attach stream broke", instance=self.id, error=str(exc))
        finally:
            if self.http is not None:
                await self.http.close()

    @property
    def age(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def redactor(self) -> Redactor | None:
        """The redactor of its granted secrets (None without secrets), for audit records."""
        return self.redaction.redactor if self.redaction else None

    @property
    def redact(self) -> Callable[[bytes], bytes] | None:
        """Replaces its granted secrets in bytes the relay made from its output (None: none
        granted): what the relay forwards is redacted, not only what the server wrote."""
        return self.redaction.apply if self.redaction else None

    def bind(self, sink: LineSink) -> None:
        """Deliver stdout lines to `sink` from now on (held back until this is called)."""
        self._sink = sink
        self._sink_bound.set()

    async def sample_pids(self) -> None:
        """Read the pids-limit counter now, while the container (and its cgroup) exists."""
        if self.alive:
            hits = await asyncio.to_thread(self.backend.pids_limit_hits, self.container_id)
            self.pids_limit_hits = max(self.pids_limit_hits, hits)

    async def send(self, line: bytes) -> None:
        if self.http is not None:
            await self.http.send(line)
        else:
            await self.stdio.send(line)

    async def _read(self) -> None:
        try:
            source = self.stdio.lines() if self.http is None else self._paced(self.http.lines())
            async for line in source:
                self.answered.set()
                await self._sink_bound.wait()
                assert self._sink is not None  # noqa: S101 - set together with the event
                if self.redaction is not None and isinstance(line, bytes):
                    await self._sink(await self.redaction.apply_off_loop(line))
                else:
                    await self._sink(line)
        except (OSError, ConnectionError) as exc:
            log.warning("attach stream broke", instance=self.id, error=str(exc))
        finally:
            self.answered.set()
            if not self._stopping:  # else `stop` learns how it ended, with its deadlines
                report = await self._exit_report()
                if not self.exited.done():
                    self.exited.set_result(report)

    async def _paced(
        self, messages: AsyncIterator[bytes | OversizedLine]
    ) -> AsyncIterator[bytes | OversizedLine]:
        """A streamable-HTTP server's messages, charged to the instance's one output pace
        (its attach socket, carrying its logs, is charged too): the stdio reader's rules."""
        lines = size = 0
        async for message in messages:
            yield message
            lines += 1
            size += len(message) if isinstance(message, bytes) else message.seen
            if lines >= YIELD_EVERY:
                await asyncio.sleep(self.stdio.pace.charge(lines, size))
                lines = size = 0

    async def _exit_report(self) -> ExitReport:
        try:
            status: ExitStatus = await asyncio.wait_for(
                asyncio.to_thread(self.backend.wait, self.container_id, int(ENGINE_DEADLINE)),
                ENGINE_DEADLINE + 5,
            )
            hits = await asyncio.wait_for(
                asyncio.to_thread(self.backend.pids_limit_hits, self.container_id),
                ENGINE_DEADLINE,
            )
        except ContainerGone:
            status, hits = ExitStatus(exit_code=-1, oom_killed=False), 0
        except Exception as exc:  # the engine failed to say; report what we know
            log.warning("could not learn how the container ended", instance=self.id, error=str(exc))
            status, hits = ExitStatus(exit_code=-1, oom_killed=False), 0
        hits = max(hits, self.pids_limit_hits)
        return ExitReport(status.exit_code, status.oom_killed, hits, self._stopping)

    async def stop(self, grace_seconds: float) -> ExitReport:
        """Close the attach stream, then SIGTERM, grace, SIGKILL; always removed. Idempotent.

        The attach stream goes first: while dockerd is blocked writing output nobody reads
        (a flooding server whose host stopped reading), it cannot finish a stop, and the
        container would never end. Every engine call has a deadline.
        """
        self._stopping = True
        with contextlib.suppress(Exception):  # best effort: the cgroup may be gone
            await asyncio.wait_for(self.sample_pids(), 10)
        await _finish(self._reader)
        await self.stdio.close()
        if not self.exited.done():
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(
                        self.backend.kill_gracefully, self.container_id, grace_seconds
                    ),
                    grace_seconds + ENGINE_DEADLINE,
                )
            except ContainerGone:
                pass
            except Exception as exc:  # the engine is stuck or failed: say so, remove anyway
                log.warning(
                    "could not stop the container in time", instance=self.id, error=str(exc)
                )
            if not self.exited.done():
                self.exited.set_result(await self._exit_report())
        report = self.exited.result()
        if self.http is not None:
            await self.http.close()
        await _finish(self._drain)
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self.backend.remove, self.container_id), ENGINE_DEADLINE
            )
        except Exception as exc:  # the reconcile loop removes it later (it is not ours now)
            log.warning("could not remove the container", instance=self.id, error=str(exc))
        return report


async def _finish(task: asyncio.Task[None] | None) -> None:
    """Cancel a reader task and take its outcome: a task that already failed (its consumer,
    a host's stream, went away mid-write) must not end as "exception never retrieved"."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        log.info("an instance's reader had stopped", error=f"{type(exc).__name__}: {exc}")
