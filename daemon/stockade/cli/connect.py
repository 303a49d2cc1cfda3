"""`stockade connect NAME` over gRPC (`--grpc`, `--address`), and `--listen`.

The default bridge is `cli/bridge.py` (the framed relay, no gRPC imported); this module is
loaded only for these paths. With `--listen`, a loopback plain-HTTP door to the daemon's
HTTPS front instead (`cli/http_bridge.py`).

stdin lines go to the daemon as `Relay.Connect` frames, one JSON-RPC message each; frames
from the daemon go to stdout, one per line. Diagnostics go to stderr only.
A line over the size limit is answered here with a JSON-RPC error and never sent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc

from stockade import exitcodes
from stockade.cli.bridge import EOF_GRACE_SECONDS, Pending
from stockade.cli.channel import CliError, Connection, connection, rpc_error
from stockade.cli.stdio import Input, Output
from stockade.cli.terminal import printable
from stockade.v1 import relay_pb2, relay_pb2_grpc
from stockade.wire import rpc
from stockade.wire.lines import LineSplitter, OversizedLine


class _Bridge:
    """One host's stdio, carried over one Relay.Connect stream."""

    def __init__(
        self, target: Connection, stdin: Input, stdout: Output, drain_seconds: float
    ) -> None:
        self._target = target
        self._drain_seconds = drain_seconds
        self._stdin = stdin
        self._emit = stdout.line
        self._pending = Pending()
        self.stdin_closed = asyncio.Event()

    async def pump_stdin(self, call: Any, limit: int) -> None:
        """stdin lines to the daemon; an oversized line is answered here, never sent."""
        splitter = LineSplitter(limit)
        try:
            while chunk := await self._stdin.read():
                for line in splitter.feed(chunk):
                    if isinstance(line, OversizedLine):
                        await self._emit(rpc.line_too_large(line.head, line.seen, limit))
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
    link = _Bridge(target, await Input.open(), await Output.open(), drain_seconds)
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


def cmd_connect_heavy(args: argparse.Namespace) -> int:
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
