"""Async line I/O over a container's attach socket.

`AttachedStdio` owns the socket from `DockerBackend.attach`: it writes JSON-RPC lines to the
container's stdin and yields complete stdout lines, while stderr goes to a callback (stderr
is for logs of any kind, never an error signal). Reads are pulled by the caller, so a slow
consumer slows the container down (backpressure) instead of growing a queue. Reading is
also paced (`sandbox/pace.py`): past its budget of lines and bytes a second, an instance's
socket is not read for a while, and every `YIELD_EVERY` lines the event loop serves the
other sessions, so one flooding server never holds the loop.

stdin is never half-closed. Containers are created with StdinOnce off, so that a shared
instance survives a daemon restart and can be attached again; the price is that Docker ends
the attachment's output on a half-close while the server's stdin stays open. A server is
stopped with the runtime's `stop` (SIGTERM, grace, SIGKILL), never by closing its stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from stockade.sandbox.pace import YIELD_EVERY, OutputLimits, OutputPace
from stockade.sandbox.runtime import Attachment
from stockade.sandbox.stdio import MultiplexDecoder, Stream
from stockade.wire.lines import LineSplitter, OversizedLine

READ_CHUNK = 16 * 1024  # bounds the splitting done between two turns of the loop
StderrSink = Callable[[bytes], None]
# Applied to the stderr *stream* before it is cut into lines (the redactor: a secret may
# span lines); `final` is True once at the end, to flush what it held back.
StderrFilter = Callable[[bytes, bool], bytes]


class _AttachReader(asyncio.StreamReader):
    """asyncio's stream reader, able to say whether a read now would return at once."""

    def buffered(self) -> int:
        return len(self._buffer)  # type: ignore[attr-defined]  # asyncio's own (CPython 3.4+)


async def write_line(writer: asyncio.StreamWriter, lock: asyncio.Lock, message: bytes) -> None:
    """One message as one line to a server's stdin, whole (one writer at a time), with
    backpressure. A raw newline in it would make two messages of one: refused."""
    if b"\n" in message:
        raise ValueError("a message sent to a container must not contain a newline")
    async with lock:
        writer.write(message + b"\n")
        await writer.drain()


class AttachedStdio:
    """One container's stdin (write lines) and stdout (read lines) over the attach socket."""

    def __init__(
        self,
        reader: _AttachReader,
        writer: asyncio.StreamWriter,
        attachment: Attachment,
        max_line_bytes: int,
        on_stderr: StderrSink,
        *,
        stderr_filter: StderrFilter | None = None,
        limits: OutputLimits | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._attachment = attachment
        self._decoder = MultiplexDecoder()
        self._stdout = LineSplitter(max_line_bytes)
        self._stderr = LineSplitter(max_line_bytes)
        self._on_stderr = on_stderr
        self._stderr_filter = stderr_filter
        self._write_lock = asyncio.Lock()
        self.pace = OutputPace(limits or OutputLimits())  # never unpaced

    @classmethod
    async def open(
        cls,
        attachment: Attachment,
        max_line_bytes: int,
        on_stderr: StderrSink,
        *,
        stderr_filter: StderrFilter | None = None,
        limits: OutputLimits | None = None,
    ) -> AttachedStdio:
        loop = asyncio.get_running_loop()
        reader = _AttachReader(limit=READ_CHUNK)
        transport, protocol = await loop.create_connection(
            lambda: asyncio.StreamReaderProtocol(reader), sock=attachment.sock
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return cls(
            reader,
            writer,
            attachment,
            max_line_bytes,
            on_stderr,
            stderr_filter=stderr_filter,
            limits=limits,
        )

    async def send(self, message: bytes) -> None:
        """Write one message as one line. The caller guarantees it holds no raw newline."""
        await write_line(self._writer, self._write_lock, message)

    async def lines(self) -> AsyncIterator[bytes | OversizedLine]:
        """stdout lines as they complete, until the container's output ends (paced)."""
        while True:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                for line in self._stderr_lines(b"", final=True):
                    self._on_stderr(line)
                return
            # The pace is charged for the work a frame costs, not for the lines it yields:
            # each newline in it (blank lines, which are dropped, cost a turn of the
            # splitter too), and a frame with none as one, counted at C speed.
            owed = 0
            for stream, payload in self._decoder.feed(data):
                owed += max(1, payload.count(b"\n"))
                handled = 0
                if stream is Stream.STDOUT:
                    for out in self._stdout.feed(payload):
                        yield out
                        handled += 1
                        if handled % YIELD_EVERY == 0:
                            await asyncio.sleep(0)  # a turn for everyone else (charged)
                else:
                    for line in self._stderr_lines(payload, final=False):
                        self._on_stderr(line)
                if owed >= YIELD_EVERY:
                    await self._breathe(owed, 0)
                    owed = 0
            wait = self.pace.charge(owed, len(data))
            if wait or self._reader.buffered():  # else the next read waits: others' turn
                await asyncio.sleep(wait)

    async def _breathe(self, lines: int, size: int) -> None:
        """Charge the pace, then give the event loop to others: a turn, or the wait owed."""
        await asyncio.sleep(self.pace.charge(lines, size))

    def _stderr_lines(self, payload: bytes, *, final: bool) -> list[bytes]:
        if self._stderr_filter is not None:
            payload = self._stderr_filter(payload, final)
        return [
            line
            for line in self._stderr.feed(payload + (b"\n" if final else b""))
            if isinstance(line, bytes)
        ]

    async def close(self) -> None:
        # End the connection first (asyncio's close only drops our descriptor, and the
        # SDK holds another): dockerd must see it go to stop writing to it.
        self._attachment.shutdown()
        self._writer.close()
        with contextlib.suppress(OSError):  # the engine may have closed it first
            await self._writer.wait_closed()
        with contextlib.suppress(OSError):
            self._attachment.close()
