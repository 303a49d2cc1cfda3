"""`stockade connect NAME`: the stdio bridge an MCP host launches as its server command.

stdin lines go to the daemon as frames, one JSON-RPC message each; frames from the daemon go
to stdout, one per line. Diagnostics go to stderr only (stdout belongs to the protocol).
A line over the size limit is answered here with a JSON-RPC error and never sent.
"""

from __future__ import annotations

import asyncio
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


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _stdout_writer() -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def bridge(path: Path, server: str, max_message_bytes: int) -> int:
    stdin = await _stdin_reader()
    stdout = await _stdout_writer()
    write_lock = asyncio.Lock()

    async def emit(message: bytes) -> None:
        async with write_lock:
            stdout.write(message + b"\n")
            await stdout.drain()

    async def frames() -> AsyncIterator[relay_pb2.ClientFrame]:
        yield relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server=server))
        splitter = LineSplitter(max_message_bytes)
        while chunk := await stdin.read(READ_CHUNK):
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
