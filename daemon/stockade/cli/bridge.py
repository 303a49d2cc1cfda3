"""`stockade connect NAME`: the stdio bridge an MCP host launches, once per session.

It speaks the framed relay (`wire/frames.py`) over TLS 1.3 with the host's client
certificate to the daemon's relay socket (next to the gRPC one; `api/frames.py`). It imports
only the standard library and a few small modules of ours: a host starts one per session, so
its start-up time and memory are what every session pays (`bench/bridge.py`). `--grpc`,
`--address` (gRPC over TCP) and `--listen` (the loopback HTTP door) take the heavier paths
in `cli/connect.py`.

stdin lines go to the daemon as `message` frames; `message` frames from the daemon go to
stdout, one per line. Diagnostics go to stderr only (stdout belongs to the protocol). A line
over the daemon's size limit is answered here (-32003, with its request id) and never sent;
requests still pending when the daemon goes away are answered here too (-32004).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import stat
import sys
import threading
import time
from pathlib import Path

from stockade import exitcodes
from stockade.cli.errors import CliError
from stockade.cli.locate import credential_folder, no_credentials_message
from stockade.cli.terminal import printable
from stockade.paths import (
    PathSettingError,
    default_socket_path,
    default_state_dir,
    read_path_setting,
    relay_socket_path,
)
from stockade.pki import SERVER_NAME
from stockade.wire import frames, rpc
from stockade.wire.frames import FrameError
from stockade.wire.lines import LineSplitter, OversizedLine

TYPE_CHECKING = False  # not typing's: the bridge does not import typing
if TYPE_CHECKING:
    from typing import Any

# After the host closes stdin, how long the bridge waits for the answers still owed before
# it exits anyway: a host that closed stdin wants the process gone (`--drain` for scripts
# that pipe a file in and want every answer).
EOF_GRACE_SECONDS = 1.0
HANDSHAKE_SECONDS = 10.0

# ERROR frame codes whose reason is the daemon's own sentence, said as it is.
_PLAIN = {frames.UNKNOWN_SERVER}
# ERROR frame codes that mean something failed rather than was refused.
_FAILED = {frames.UNAVAILABLE, frames.BAD_FRAME, frames.TOO_LARGE, frames.TIMEOUT}


class Pending:
    """Ids of the host's requests not answered yet, so none is left hanging at the end."""

    def __init__(self) -> None:
        self._ids: dict[str, Any] = {}

    def sent(self, line: bytes) -> None:
        head = rpc.peek_head(line)
        if head is not None and head[0] == b"method":  # the usual request: no parse
            self._ids[rpc.id_key(head[1])] = head[1]
            return
        body = _lenient(line)
        if isinstance(body, dict) and "method" in body and "id" in body:
            self._ids[rpc.id_key(body["id"])] = body["id"]

    def received(self, message: bytes) -> None:
        head = rpc.peek_head(message)
        if head is not None:
            if head[0] != b"method":  # an answer; else the server's own request
                self._ids.pop(rpc.id_key(head[1]), None)
            return
        body = _lenient(message)
        if isinstance(body, dict) and "method" not in body and "id" in body:
            self._ids.pop(rpc.id_key(body["id"]), None)

    def fail_all(self, why: str) -> list[bytes]:
        ids, self._ids = list(self._ids.values()), {}
        return [rpc.error_response(i, rpc.DAEMON_GONE, why) for i in ids]


def _lenient(raw: bytes) -> Any:
    """A quick read of a line's id and method (the daemon parses strictly)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # the daemon refuses it; the bridge only peeks
        return None


class Target:
    """Where the framed relay is and the host's credentials."""

    def __init__(
        self, unix_path: Path | None, tcp: tuple[str, int] | None, cert: Path, key: Path, ca: Path
    ) -> None:
        self.unix_path, self.tcp = unix_path, tcp
        self.cert, self.key, self.ca = cert, key, ca

    @property
    def shown(self) -> str:
        return f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp else f"unix:{self.unix_path}"

    def context(self) -> ssl.SSLContext:
        """TLS 1.3, the daemon verified against our CA under its fixed name, our certificate."""
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_verify_locations(cafile=self.ca)
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"cannot read credentials: {exc}", exitcodes.REFUSED) from None
        return context


def target_of(args: argparse.Namespace) -> Target:
    """The relay to reach and the credentials to use, from flags, settings and defaults."""
    try:
        socket_path = (
            Path(args.socket)
            if args.socket
            else read_path_setting("socket_path", default_socket_path())
        )
        state_dir = read_path_setting("state_dir", default_state_dir())
    except PathSettingError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from None
    unix_path: Path | None = relay_socket_path(socket_path)
    tcp: tuple[str, int] | None = None
    if args.relay_address:
        host, _, port = args.relay_address.rpartition(":")
        if not host or not port.isdigit():
            raise CliError("--relay-address must be HOST:PORT", exitcodes.USAGE)
        unix_path, tcp = None, (host.strip("[]"), int(port))
    folder = credential_folder(state_dir, as_host=True)
    cert = args.cert or (folder / "client.crt" if folder else None)
    key = args.key or (folder / "client.key" if folder else None)
    ca = args.ca or (folder / "ca.crt" if folder else None)
    if cert is None or key is None or ca is None:
        if unix_path is not None and not unix_path.exists():  # the more useful of two problems
            raise CliError(_unreachable(f"unix:{unix_path}"), exitcodes.UNREACHABLE)
        raise CliError(no_credentials_message(), exitcodes.REFUSED)
    return Target(unix_path, tcp, cert, key, ca)


def _unreachable(shown: str) -> str:
    return f"the daemon does not answer on {shown}; start it with `stockaded`"


def _handshake_refused(shown: str, exc: BaseException) -> CliError:
    """The daemon ended the connection before any frame: it refused our certificate (its
    audit log says why), or we refused its own."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CliError(
            f"the daemon at {shown} is not the one our CA certificate names: {exc.verify_message}",
            exitcodes.REFUSED,
        )
    return CliError(
        f"the daemon at {shown} refused the TLS handshake: the client certificate is "
        "missing, expired or from another CA",
        exitcodes.REFUSED,
    )


def _refusal(code: object, reason: object) -> CliError:
    """An ERROR frame as the one line the CLI prints, with its exit code."""
    said = str(reason)
    if code in _PLAIN:
        return CliError(said, exitcodes.REFUSED)
    return CliError(f"refused: {said}", exitcodes.FAILED if code in _FAILED else exitcodes.REFUSED)


def _is_stream(fd: int) -> bool:
    """Pipes and sockets (what hosts use) can be polled; files, terminals and /dev/null
    (which epoll refuses) cannot."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _stdin_fd() -> int:
    """stdin as a pollable, non-blocking fd: itself if it is a pipe, else a pipe that a
    thread fills from it (a redirected file)."""
    fd = sys.stdin.fileno()
    if not _is_stream(fd):
        read_end, write_end = os.pipe()

        def copy() -> None:
            try:
                while chunk := os.read(fd, READ_CHUNK):
                    os.write(write_end, chunk)
            finally:
                os.close(write_end)

        threading.Thread(target=copy, daemon=True).start()
        fd = read_end
    os.set_blocking(fd, False)
    return fd


class _Stdout:
    """Lines to stdout: non-blocking on a pipe, with what the host has not read yet kept
    here (the bridge stops reading the daemon while it is over HIGH_WATER)."""

    def __init__(self) -> None:
        self.fd = sys.stdout.fileno()
        self.pollable = _is_stream(self.fd)
        if self.pollable:
            os.set_blocking(self.fd, False)
        self.buffer = bytearray()

    def line(self, data: bytes) -> None:
        self.buffer += data
        self.buffer += b"\n"
        self.flush()

    def flush(self) -> None:
        while self.buffer:
            try:
                written = os.write(self.fd, self.buffer)
            except BlockingIOError:
                return
            del self.buffer[:written]

    def finish(self) -> None:
        """Whatever is left, written before the bridge exits."""
        if self.pollable:
            os.set_blocking(self.fd, True)
        self.flush()


HIGH_WATER = 1024 * 1024  # bytes waiting for the host (stdout) or the daemon (socket)
READ_CHUNK = 64 * 1024


class FramedBridge:
    """One host's stdio, carried over one framed relay connection, on one thread.

    `selectors` rather than asyncio: asyncio's import alone is most of the bridge's start-up
    time. The socket is non-blocking TLS: a read may find no whole record
    (`SSLWantReadError`), and decrypted bytes may wait inside the TLS object, so reading
    goes on until it says so.
    """

    def __init__(self, tls: ssl.SSLSocket, drain_seconds: float) -> None:
        self._tls = tls
        self._drain_seconds = drain_seconds
        self._pending = Pending()
        self._stdout = _Stdout()
        self._outgoing = bytearray()  # frames for the daemon not yet taken by the socket
        self._watched: dict[Any, int] | None = None  # what the selector waits for now
        self.stdin_closed = False

    # -- opening (blocking: nothing else to do until the session exists) --------------

    def _read_exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self._tls.recv(count - len(data))
            if not chunk:  # asyncio drops the TLS alert of a refused handshake: this is it
                raise EOFError
            data += chunk
        return bytes(data)

    def open(self, server: str) -> int:
        """Ask for the session; the daemon's message limit once it is open."""
        self._tls.sendall(frames.control(frames.OPEN, server=server, options={}))
        while True:
            kind, length = frames.check_header(
                self._read_exactly(frames.HEADER.size), frames.CONTROL_LIMIT
            )
            frame = frames.Frame(kind, self._read_exactly(length) if length else b"")
            if frame.kind != frames.MESSAGE:
                break
            # Said before the session opens: e.g. that it waits for a sandbox to start.
            self._frame(frame)
        fields = frame.fields()
        if frame.kind == frames.ERROR:
            raise _refusal(fields.get("code"), fields.get("reason"))
        limit = fields.get("max_message_bytes")
        if frame.kind != frames.OPENED or not isinstance(limit, int) or limit < 1:
            raise FrameError(frames.BAD_FRAME, f"expected `opened`, got {frame.name}")
        return limit

    # -- serving ----------------------------------------------------------------------

    def daemon_gone(self, why: str) -> None:
        """Every request still pending gets an error: a host shows it instead of hanging."""
        for error in self._pending.fail_all(f"the Stockade daemon went away: {why}"):
            self._stdout.line(error)

    def serve(self, limit: int) -> int:
        """Both directions until the daemon ends, or `drain_seconds` after stdin ended."""
        self._tls.setblocking(False)
        stdin = _stdin_fd()
        splitter = LineSplitter(limit)
        # Answers are re-serialised by the daemon and may be somewhat longer than the limit
        # it enforces on what it reads (the gRPC client allows the same).
        incoming = frames.FrameBuffer(2 * limit + 1024 * 1024)
        deadline: float | None = None
        with selectors.DefaultSelector() as selector:
            while True:
                self._watch(selector, stdin)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = selector.select(timeout)
                if deadline is not None and time.monotonic() >= deadline:
                    return exitcodes.OK  # the host closed stdin: ended after the grace period
                for key, events in ready:
                    if key.fd == self._stdout.fd:
                        self._stdout.flush()
                    elif key.fd == stdin:
                        if not self._from_stdin(stdin, splitter, limit):
                            deadline = time.monotonic() + self._drain_seconds
                    elif events & selectors.EVENT_WRITE:
                        self._send()
                if len(self._stdout.buffer) < HIGH_WATER:
                    ended = self._from_daemon(incoming)
                    if ended is not None:
                        return ended

    def _watch(self, selector: selectors.BaseSelector, stdin: int) -> None:
        """What to wait for now: input only while its consumer keeps up."""
        wanted: dict[Any, int] = {}
        if not self.stdin_closed and len(self._outgoing) < HIGH_WATER:
            wanted[stdin] = selectors.EVENT_READ
        socket_events = selectors.EVENT_WRITE if self._outgoing else 0
        if len(self._stdout.buffer) < HIGH_WATER:
            socket_events |= selectors.EVENT_READ
        if socket_events:
            wanted[self._tls] = socket_events
        if self._stdout.pollable and self._stdout.buffer:
            wanted[self._stdout.fd] = selectors.EVENT_WRITE
        if wanted == self._watched:  # the usual turn: nothing to change
            return
        self._watched = wanted
        for key in list(selector.get_map().values()):
            if key.fileobj not in wanted:
                selector.unregister(key.fileobj)
        for fileobj, events in wanted.items():
            try:
                if selector.get_key(fileobj).events != events:
                    selector.modify(fileobj, events)
            except KeyError:
                selector.register(fileobj, events)

    def _from_stdin(self, stdin: int, splitter: LineSplitter, limit: int) -> bool:
        """stdin lines to the daemon; an oversized line is answered here, never sent.
        False once stdin has ended (`end` is then on its way)."""
        try:
            chunk = os.read(stdin, READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            self.stdin_closed = True
            self._queue(frames.encode(frames.END))
            return False
        for line in splitter.feed(chunk):
            if isinstance(line, OversizedLine):
                self._stdout.line(rpc.line_too_large(line.head, line.seen, limit))
                continue
            self._pending.sent(line)
            self._queue(frames.encode(frames.MESSAGE, line))
        return True

    def _queue(self, frame: bytes) -> None:
        self._outgoing += frame
        self._send()

    def _send(self) -> None:
        while self._outgoing:
            try:
                sent = self._tls.send(self._outgoing)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            del self._outgoing[:sent]

    def _from_daemon(self, incoming: frames.FrameBuffer) -> int | None:
        """Read what the daemon sent; an exit code once the session is over."""
        while len(self._stdout.buffer) < HIGH_WATER:
            try:
                data = self._tls.recv(READ_CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return None
            if not data:
                return self._ended(incoming)
            for frame in incoming.feed(data):
                done = self._frame(frame)
                if done is not None:
                    return done
        return None

    def _frame(self, frame: frames.Frame) -> int | None:
        if frame.kind == frames.MESSAGE:
            if not frame.payload or b"\n" in frame.payload or b"\r" in frame.payload:
                # stdout is one message per line: never a line the daemon did not mean
                raise FrameError(frames.BAD_FRAME, "a message frame that is not one line")
            self._pending.received(frame.payload)
            self._stdout.line(frame.payload)
            return None
        if frame.kind == frames.CLOSED:
            reason = str(frame.fields().get("reason"))
            self.daemon_gone(reason)
            print(f"stockade connect: {printable(reason)}", file=sys.stderr)
            return exitcodes.FAILED
        if frame.kind == frames.ERROR:
            fields = frame.fields()
            self.daemon_gone(str(fields.get("reason")))
            raise _refusal(fields.get("code"), fields.get("reason"))
        raise FrameError(frames.BAD_FRAME, f"unexpected {frame.name} frame")

    def _ended(self, incoming: frames.FrameBuffer) -> int:
        """The daemon ends a session with a frame, or after `end` once it drained: an end of
        the stream before that is a daemon that went away (killed, stopped)."""
        self.daemon_gone("the connection ended")
        if incoming.partial or not self.stdin_closed:
            raise ConnectionError("the connection ended")
        return exitcodes.OK

    def finish(self) -> None:
        self._stdout.finish()


def _connect(target: Target) -> ssl.SSLSocket:
    """The TLS connection to the relay, handshake done (bounded by HANDSHAKE_SECONDS)."""
    context = target.context()
    try:
        if target.tcp is not None:
            raw = socket.create_connection(target.tcp, timeout=HANDSHAKE_SECONDS)
        else:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(HANDSHAKE_SECONDS)
            raw.connect(str(target.unix_path))
    except OSError:
        raise CliError(_unreachable(target.shown), exitcodes.UNREACHABLE) from None
    try:
        tls = context.wrap_socket(raw, server_hostname=SERVER_NAME)
    except ssl.SSLError as exc:
        raw.close()
        raise _handshake_refused(target.shown, exc) from None
    except OSError:
        raw.close()
        raise CliError(_unreachable(target.shown), exitcodes.UNREACHABLE) from None
    tls.settimeout(None)  # opening waits for the sandbox, however long its start takes
    return tls


def bridge(target: Target, server: str, drain_seconds: float = EOF_GRACE_SECONDS) -> int:
    tls = _connect(target)
    link = FramedBridge(tls, drain_seconds)
    try:
        try:
            # TLS 1.3: the daemon checks our certificate after our side of the handshake is
            # done, so its refusal arrives on the first read.
            limit = link.open(server)
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            raise _handshake_refused(target.shown, exc) from None
        try:
            return link.serve(limit)
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            link.daemon_gone(str(exc) or type(exc).__name__)
            raise CliError(
                f"lost the daemon at {target.shown}: {exc or type(exc).__name__}",
                exitcodes.UNREACHABLE,
            ) from None
    except FrameError as exc:
        link.daemon_gone(str(exc))
        raise CliError(f"the daemon broke the relay protocol: {exc}", exitcodes.FAILED) from None
    finally:
        try:
            link.finish()
        finally:
            tls.close()


def run_framed(args: argparse.Namespace) -> int:
    target = target_of(args)
    try:
        return bridge(target, args.name, args.drain)
    except (BrokenPipeError, ConnectionResetError):  # the host went away: nothing to report to
        return exitcodes.OK


def _heavy(args: argparse.Namespace) -> bool:
    """Whether the command needs the gRPC or HTTP paths of `cli/connect.py`."""
    return args.listen is not None or args.grpc or args.address is not None


def cmd_connect(args: argparse.Namespace) -> int:
    if _heavy(args):
        from stockade.cli.connect import cmd_connect_heavy  # noqa: PLC0415 - only when asked

        return cmd_connect_heavy(args)
    return run_framed(args)


CONNECT_HELP = "stdio bridge for MCP hosts: use as the server command in a host's config"
CONNECT_EXAMPLE = (
    "example: stockade connect time   (as a host's server command; see `stockade client config`)"
)


def add_connect_arguments(connect: argparse.ArgumentParser) -> None:
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
    group = connect.add_argument_group("connection (mTLS)")
    group.add_argument(
        "--socket",
        help="the daemon's Unix socket (default: from settings); the relay is its -relay sibling",
    )
    group.add_argument(
        "--relay-address", help="the daemon's framed relay on TCP, HOST:PORT (relay_tcp_address)"
    )
    group.add_argument(
        "--grpc", action="store_true", help="use gRPC Relay.Connect instead of the framed relay"
    )
    group.add_argument(
        "--address", help="the daemon's gRPC TCP address, HOST:PORT (implies --grpc)"
    )
    group.add_argument("--cert", type=Path, help="client certificate (default: see docs)")
    group.add_argument("--key", type=Path, help="client private key")
    group.add_argument("--ca", type=Path, help="the daemon's CA certificate")


def add_connect_parser(sub: Any) -> None:
    connect = sub.add_parser("connect", help=CONNECT_HELP, epilog=CONNECT_EXAMPLE)
    add_connect_arguments(connect)
    connect.set_defaults(handler=cmd_connect)


def main(argv: list[str]) -> int:
    """`stockade connect ...` without loading the rest of the CLI (`cli/main.py` sends it here)."""
    parser = argparse.ArgumentParser(
        prog="stockade connect", description=CONNECT_HELP, epilog=CONNECT_EXAMPLE
    )
    add_connect_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; ours is 1
        return exitcodes.USAGE if exc.code not in (0, None) else exitcodes.OK
    if _heavy(args):  # the full CLI: its logging and error mapping
        from stockade.cli.commands import main as full  # noqa: PLC0415 - only when asked

        return full(["connect", *argv])
    try:
        return run_framed(args)
    except CliError as exc:
        print(f"stockade: {printable(exc)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("stockade: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
