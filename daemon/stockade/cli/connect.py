"""`stockade connect NAME`: the stdio bridge an MCP host launches as its server command.

stdin lines go to the daemon as frames, one JSON-RPC message each; frames from the daemon go
to stdout, one per line. Diagnostics go to stderr only (stdout belongs to the protocol).
A line over the size limit is answered here with a JSON-RPC error and never sent.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from stockade.cli import exitcodes
from stockade.cli.channel import CliError, open_channel, rpc_error
from stockade.relay import jsonrpc
from stockade.sandbox.stdio import LineSplitter, OversizedLine
from stockade.v1 import relay_pb2, relay_pb2_grpc

READ_CHUNK = 64 * 1024


def _is_stream(fd: int) -> bool:
    """Pipes and sockets (what hosts use) get asyncio transports; files, terminals and
    /dev/null (which epoll refuses) are served by plain I/O in a thread."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _Input:
    """stdin as async chunks: a pipe transport for pipes, a thread for redirected files."""

    def __init__(self, reader: asyncio.StreamReader | None) -> None:
        self._reader = reader

    @classmethod
    async def open(cls) -> _Input:
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


class _Output:
    """stdout with backpressure for pipes (a slow host slows the session), plain for files."""

    def __init__(self, writer: asyncio.StreamWriter | None) -> None:
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls) -> _Output:
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


async def bridge(path: Path, server: str, max_message_bytes: int) -> int:
    stdin = await _Input.open()
    stdout = await _Output.open()
    emit = stdout.line

    async def frames() -> AsyncIterator[relay_pb2.ClientFrame]:
        yield relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server=server))
        splitter = LineSplitter(max_message_bytes)
        while chunk := await stdin.read():
            for line in splitter.feed(chunk):
                if isinstance(line, OversizedLine):
                    await emit(
                        jsonrpc.error_response(
                            None,
                            jsonrpc.MESSAGE_TOO_LARGE,
                            f"message of {line.seen} bytes is over the "
                            f"{max_message_bytes}-byte limit",
                        )
                    )
                    continue
                yield relay_pb2.ClientFrame(message=line)

    async with open_channel(path) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Connect(frames())
        try:
            async for frame in call:
                kind = frame.WhichOneof("kind")
                if kind == "message":
                    await emit(frame.message)
                elif kind == "closed":
                    print(f"stockade connect: {frame.closed.reason}", file=sys.stderr)
                    return exitcodes.FAILED
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, path) from None
    return exitcodes.OK


def run_connect(path: Path, server: str, max_message_bytes: int) -> int:
    try:
        return asyncio.run(bridge(path, server, max_message_bytes))
    except CliError:
        raise
    except (BrokenPipeError, ConnectionResetError):  # the host went away: nothing to report to
        return exitcodes.OK


__all__ = ["CliError", "run_connect"]
