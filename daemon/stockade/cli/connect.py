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
import json
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


# After the host closes stdin, how long the bridge waits for the answers still owed before
# it exits anyway: a host that closed stdin wants the process gone (`--drain` for scripts
# that pipe a file in and want every answer).
EOF_GRACE_SECONDS = 1.0


class _Pending:
    """Ids of the host's requests not answered yet, so none is left hanging at the end."""

    def __init__(self) -> None:
        self._ids: dict[str, Any] = {}

    def sent(self, line: bytes) -> None:
        body = _lenient(line)
        if isinstance(body, dict) and "method" in body and "id" in body:
            self._ids[jsonrpc.id_key(body["id"])] = body["id"]

    def received(self, message: bytes) -> None:
        body = _lenient(message)
        if isinstance(body, dict) and "method" not in body and "id" in body:
            self._ids.pop(jsonrpc.id_key(body["id"]), None)

    def fail_all(self, why: str) -> list[bytes]:
        ids, self._ids = list(self._ids.values()), {}
        return [jsonrpc.error_response(i, jsonrpc.DAEMON_GONE, why) for i in ids]


def _lenient(raw: bytes) -> Any:
    """A quick read of a line's id and method (the daemon parses strictly)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


class _Bridge:
    """One host's stdio, carried over one Relay.Connect stream."""

    def __init__(
        self, target: Connection, stdin: _Input, stdout: _Output, drain_seconds: float
    ) -> None:
        self._target = target
        self._drain_seconds = drain_seconds
        self._stdin = stdin
        self._emit = stdout.line
        self._pending = _Pending()
        self.stdin_closed = asyncio.Event()

    async def pump_stdin(self, call: Any, limit: int) -> None:
        """stdin lines to the daemon; an oversized line is answered here, never sent."""
        splitter = LineSplitter(limit)
        try:
            while chunk := await self._stdin.read():
                for line in splitter.feed(chunk):
                    if isinstance(line, OversizedLine):
                        await self._emit(
                            jsonrpc.error_response(
                                jsonrpc.id_from_head(line.head),
                                jsonrpc.MESSAGE_TOO_LARGE,
                                f"message of {line.seen} bytes is over the {limit}-byte limit",
                            )
                        )
                        continue
                    self._pending.sent(line)
                    await call.write(relay_pb2.ClientFrame(message=line))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call has ended; the reader reports why
        finally:
            self.stdin_closed.set()

    async def end_after_eof(self, call: Any) -> None:
        await self.stdin_closed.wait()
        await asyncio.sleep(self._drain_seconds)
        call.cancel()

    async def daemon_gone(self, why: str) -> None:
        """Every request still pending gets an error: a host shows it instead of hanging."""
        for error in self._pending.fail_all(f"the Stockade daemon went away: {why}"):
            await self._emit(error)

    def start(self, call: Any, opened: relay_pb2.SessionOpened) -> list[asyncio.Task[None]]:
        # The daemon's limit, when it says one: a longer line is answered here.
        limit = min(
            opened.max_message_bytes or self._target.max_message_bytes,
            self._target.max_message_bytes,
        )
        return [
            asyncio.create_task(self.pump_stdin(call, limit)),
            asyncio.create_task(self.end_after_eof(call)),
        ]

    async def frames(self, call: Any) -> int:
        """Serve the daemon's frames until the stream ends; the exit code."""
        tasks: list[asyncio.Task[None]] = []
        try:
            while (frame := await call.read()) is not grpc.aio.EOF:
                assert isinstance(frame, relay_pb2.ServerFrame)  # noqa: S101 - typed stream
                kind = frame.WhichOneof("kind")
                if kind == "opened" and not tasks:
                    tasks = self.start(call, frame.opened)
                elif kind == "message":
                    self._pending.received(frame.message)
                    await self._emit(frame.message)
                elif kind == "closed":
                    await self.daemon_gone(frame.closed.reason)
                    print(f"stockade connect: {printable(frame.closed.reason)}", file=sys.stderr)
                    return exitcodes.FAILED
            if not self.stdin_closed.is_set():  # the daemon ended the stream without a word
                await self.daemon_gone("the session ended")
            return exitcodes.OK
        finally:
            for task in tasks:
                task.cancel()


async def bridge(target: Connection, server: str, drain_seconds: float = EOF_GRACE_SECONDS) -> int:
    link = _Bridge(target, await _Input.open(), await _Output.open(), drain_seconds)
    async with target.channel() as channel:
        # Write only when no refusal can be in flight: grpc.aio replaces a refusal's status
        # with INTERNAL when a client write races it (grpc/grpc#36066). The daemon sends
        # initial metadata once the caller is authenticated, and `opened` once the session
        # exists; stdin is pumped only after that.
        call = relay_pb2_grpc.RelayStub(channel).Connect()
        try:
            await call.initial_metadata()
            if not call.done():
                await call.write(relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server=server)))
            return await link.frames(call)
        except asyncio.CancelledError:
            if not link.stdin_closed.is_set():
                raise
            return exitcodes.OK  # the host closed stdin: ended after the grace period
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED and link.stdin_closed.is_set():
                return exitcodes.OK
            await link.daemon_gone(exc.details() or exc.code().name)
            raise rpc_error(exc, target.target) from None


def run_connect(target: Connection, server: str, drain_seconds: float = EOF_GRACE_SECONDS) -> int:
    try:
        return asyncio.run(bridge(target, server, drain_seconds))
    except CliError:
        raise
    except (BrokenPipeError, ConnectionResetError):  # the host went away: nothing to report to
        return exitcodes.OK


def cmd_connect(args: argparse.Namespace) -> int:
    target = connection(args, as_host=True)
    if args.listen is None:
        return run_connect(target, args.name, args.drain)
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
        "--drain",
        type=float,
        default=EOF_GRACE_SECONDS,
        metavar="SECONDS",
        help="after stdin ends, wait this long for answers still owed (default: 1)",
    )
    connect.add_argument(
        "--listen",
        help="instead of stdio, serve plain Streamable HTTP on this loopback HOST:PORT (/mcp)",
    )
    connect.add_argument(
        "--front", help="with --listen: the daemon's HTTPS front, https://HOST:PORT"
    )
    with_socket(connect, json_flag=False)
    connect.set_defaults(handler=cmd_connect)
