"""The gRPC bridge's stdin and stdout as asyncio streams (`cli/connect.py`; the default bridge
in `cli/bridge.py` runs on selectors).

Pipes and sockets (what hosts use) get asyncio transports, with backpressure on stdout (a
slow host slows the session); files, terminals and /dev/null (which epoll refuses) are
served by plain I/O, reads in a thread.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys

READ_CHUNK = 64 * 1024


def _is_stream(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class Input:
    """stdin as async chunks: a pipe transport for pipes, a thread for redirected files."""

    def __init__(self, reader: asyncio.StreamReader | None) -> None:
        self._reader = reader

    @classmethod
    async def open(cls) -> Input:
        if not _is_stream(sys.stdin.fileno()):
            return cls(None)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return cls(reader)

    async def read(self) -> bytes:
        if self._reader is not None:
            return await self._reader.read(READ_CHUNK)
        return await asyncio.to_thread(os.read, sys.stdin.fileno(), READ_CHUNK)


class Output:
    """stdout with backpressure for pipes (a slow host slows the session), plain for files."""

    def __init__(self, writer: asyncio.StreamWriter | None) -> None:
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls) -> Output:
        if not _is_stream(sys.stdout.fileno()):
            return cls(None)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, sys.stdout
        )
        return cls(asyncio.StreamWriter(transport, protocol, None, loop))

    async def line(self, message: bytes) -> None:
        async with self._lock:
            if self._writer is not None:
                self._writer.write(message + b"\n")
                await self._writer.drain()
            else:
                sys.stdout.buffer.write(message + b"\n")
                sys.stdout.buffer.flush()
