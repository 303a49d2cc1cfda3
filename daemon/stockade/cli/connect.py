"""`stockade connect NAME`: the stdio bridge an MCP host launches as its server command.

With `--listen`, a loopback plain-HTTP door to the daemon's HTTPS front instead
(`cli/http_bridge.py`).

stdin lines go to the daemon as frames, one JSON-RPC message each; frames from the daemon go
to stdout, one per line. Diagnostics go to stderr only (stdout belongs to the protocol).
A line over the size limit is answered here with a JSON-RPC error and never sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from typing import Any

import grpc

from stockade import exitcodes
from stockade.cli.channel import CliError, Connection, connection, rpc_error, with_socket
from stockade.cli.terminal import printable
from stockade.relay import jsonrpc
from stockade.v1 import relay_pb2, relay_pb2_grpc
from stockade.wire.lines import LineSplitter, OversizedLine

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


async def bridge(target: Connection, server: str) -> int:
    max_message_bytes = target.max_message_bytes
    stdin = await _Input.open()
    stdout = await _Output.open()
    emit = stdout.line

    async def pump_stdin(call: Any) -> None:
        """stdin lines to the daemon; an oversized line is answered here, never sent."""
        splitter = LineSplitter(max_message_bytes)
        try:
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
                    await call.write(relay_pb2.ClientFrame(message=line))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call has ended; the reader reports why

    async with target.channel() as channel:
        # Write only when no refusal can be in flight: grpc.aio replaces a refusal's status
        # with INTERNAL when a client write races it (grpc/grpc#36066). The daemon sends
        # initial metadata once the caller is authenticated, and `opened` once the session
        # exists; stdin is pumped only after that.
        call = relay_pb2_grpc.RelayStub(channel).Connect()
        writer: asyncio.Task[None] | None = None
        try:
            await call.initial_metadata()
            if not call.done():
                await call.write(relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server=server)))
            while (frame := await call.read()) is not grpc.aio.EOF:
                assert isinstance(frame, relay_pb2.ServerFrame)  # noqa: S101 - typed stream
                kind = frame.WhichOneof("kind")
                if kind == "opened" and writer is None:
                    writer = asyncio.create_task(pump_stdin(call))
                elif kind == "message":
                    await emit(frame.message)
                elif kind == "closed":
                    print(f"stockade connect: {printable(frame.closed.reason)}", file=sys.stderr)
                    return exitcodes.FAILED
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, target.target) from None
        finally:
            if writer is not None:
                writer.cancel()
    return exitcodes.OK


def run_connect(target: Connection, server: str) -> int:
    try:
        return asyncio.run(bridge(target, server))
    except CliError:
        raise
    except (BrokenPipeError, ConnectionResetError):  # the host went away: nothing to report to
        return exitcodes.OK


def cmd_connect(args: argparse.Namespace) -> int:
    target = connection(args, as_host=True)
    if args.listen is None:
        return run_connect(target, args.name)
    from stockade.cli.http_bridge import BridgeError, HttpBridge  # noqa: PLC0415

    if not args.front:
        raise CliError(
            "--listen needs --front https://HOST:PORT (the daemon's http_address)", exitcodes.USAGE
        )
    url = f"{args.front.rstrip('/')}/servers/{args.name}/mcp"
    http_bridge = HttpBridge(url, target.cert, target.key, target.ca)
    print(f"serving http://{args.listen}/mcp -> {url}", file=sys.stderr)
    try:
        asyncio.run(http_bridge.serve(args.listen))
    except BridgeError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    except OSError as exc:
        raise CliError(
            f"cannot listen on {args.listen}: {exc.strerror}", exitcodes.FAILED
        ) from None
    return exitcodes.OK


def add_connect_parser(sub: Any) -> None:
    connect = sub.add_parser(
        "connect",
        help="stdio bridge for MCP hosts: use as the server command in a host's config",
        epilog="example: stockade connect time   (as a host's server command; see "
        "`stockade client config`)",
    )
    connect.add_argument("name", help="registered server to connect to")
    connect.add_argument(
        "--listen",
        help="instead of stdio, serve plain Streamable HTTP on this loopback HOST:PORT (/mcp)",
    )
    connect.add_argument(
        "--front", help="with --listen: the daemon's HTTPS front, https://HOST:PORT"
    )
    with_socket(connect, json_flag=False)
    connect.set_defaults(handler=cmd_connect)
