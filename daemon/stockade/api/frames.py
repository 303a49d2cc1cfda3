"""The framed relay listener: one host session per TLS 1.3 connection (`wire/frames.py`).

Why a second relay next to `Relay.Connect`: the bridge a host launches per session
(`stockade connect`) then needs no gRPC, so it starts in a fraction of the time and memory,
and each message crosses one asyncio TLS stream instead of two gRPC stacks. Sessions are
opened by the same `SessionOpener` and served by the same `HostSession` as over gRPC.

Fail closed, as the gRPC listener:
- TLS 1.3 only, no session tickets (every connection is a full handshake), and a client
  certificate from the daemon's CA required by the handshake. Then
  `api.auth.check_certificate`, the gRPC listener's own check, reads the SAN URI identity,
  refuses a revoked serial (the CA's in-process list, as on every gRPC call) and a role that
  may not relay. Revoking a certificate ends its open streams (`SessionOpener.revoke`).
- Every refusal before a session, TLS handshake failures included, is an `access` record
  (outcome deny, the reason, the identity and subject of the certificate when it could be
  read). Python's ssl hides a certificate that failed chain verification, so those records
  carry OpenSSL's reason instead. Repeats of the same (identity, reason) are one record per
  minute with a count (`relay/digest.py`): a flood of bad handshakes cannot grow the audit
  log at its own rate. Reasons come from OpenSSL's fixed vocabulary or name a certificate
  this CA issued, so the keys are bounded too.
- Bounded: connections still handshaking or not yet opened (`PENDING_LIMIT` per socket
  kind, at most `PENDING_PER_ADDRESS` from one IP address; when full, the oldest is let go
  if it has idled over `IDLE_SECONDS`, so idle connections cannot lock hosts out; each with
  a deadline: `HANDSHAKE_SECONDS`, then `OPEN_SECONDS` for `open`); open streams
  share `max_relay_streams` with gRPC (`api/streams.py`); a frame over the limit is refused
  from its header, with an `error` frame, and ends that stream only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from stockade.api.auth import METHOD_RULES, RELAY_METHOD, Denied, check_certificate
from stockade.api.streams import StreamBudget
from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger, log_context
from stockade.pki.authority import CertificateAuthority
from stockade.pki.identity import IdentityError, PeerCertificate, peer_from_pem, subject_of
from stockade.relay.budget import capped
from stockade.relay.digest import Digest
from stockade.relay.host_session import HostSession
from stockade.relay.opening import OpenRefused, Refusal, SessionOpener
from stockade.wire import frames
from stockade.wire.frames import FrameError

log = get_logger("stockade.frames")

HANDSHAKE_SECONDS = 10.0  # a TLS handshake not done by then is dropped (slowloris)
OPEN_SECONDS = 10.0  # after it, the `open` frame must arrive within this
PENDING_LIMIT = 128  # connections handshaking or not yet opened, at once, per socket kind
PENDING_PER_ADDRESS = 16  # of which from one IP address (TCP; a Unix socket's peers are one
# user id often, a host's many bridges: there the oldest idle ones are let go instead)
IDLE_SECONDS = 1.0  # a pending connection this old when the places are full is let go
READ_BUFFER = 256 * 1024  # per connection, beyond the frame being read
TRANSPORT = "frames"

ERROR_CODES = {
    Refusal.UNKNOWN_SERVER: frames.UNKNOWN_SERVER,
    Refusal.DENIED: frames.DENIED,
    Refusal.QUOTA: frames.QUOTA,
    Refusal.UNAVAILABLE: frames.UNAVAILABLE,
}


def server_context(cert_path: Path, key_path: Path, ca_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3 only, a client certificate from `ca_pem` required, no resumption."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert_path, key_path)
    context.load_verify_locations(cadata=ca_pem.decode())
    context.num_tickets = 0  # a resumed session would skip the certificate check
    return context


def handshake_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed, in a bounded vocabulary (OpenSSL's, or ours)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake refused: {exc.verify_message or 'certificate verify failed'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake refused: {(exc.reason or 'TLS error').lower().replace('_', ' ')}"
    # asyncio aborts a slow handshake with ConnectionAbortedError ("taking longer than").
    if isinstance(exc, TimeoutError) or "longer than" in str(exc):
        return f"TLS handshake not done within {HANDSHAKE_SECONDS:g} s"
    return "the connection ended during the TLS handshake"


class _HostFrames:
    """The host's side of one connection: frames written whole, with backpressure."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def frame(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def message(self, raw: bytes) -> None:
        await self.frame(frames.encode(frames.MESSAGE, raw))

    async def error(self, code: str, reason: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.frame(frames.control(frames.ERROR, code=code, reason=reason))


class FramedRelay:
    """The listener; `start` on the Unix socket (and TCP), `stop` ends every connection."""

    def __init__(
        self,
        opener: SessionOpener,
        authority: CertificateAuthority,
        audit: AuditLog,
        streams: StreamBudget,
        context: ssl.SSLContext,
        *,
        max_message_bytes: int,
        drain_seconds: float,
    ) -> None:
        self._opener = opener
        self._authority = authority
        self._audit = audit
        self._streams = streams
        self._context = context
        self._max = max_message_bytes
        self._drain_seconds = drain_seconds
        self._refusals = Digest()
        # Connections not yet opened, oldest first, per socket kind ("unix", "tcp"), and
        # how many each source holds: one source cannot take every place, and when the
        # places are full the oldest is let go, so a flood of idle connections cannot keep
        # a host that completes its handshake out.
        self._pending: dict[str, list[tuple[float, asyncio.Task[Any]]]] = {"unix": [], "tcp": []}
        self._pending_by_source: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._unix_paths: list[Path] = []

    async def start(
        self,
        unix_path: Path | None,
        tcp_address: str | None = None,
        activated: socket.socket | None = None,
    ) -> list[str]:
        """Listen; returns the addresses. The socket file is 0660, as the gRPC socket."""
        addresses = []
        loop = asyncio.get_running_loop()
        if activated is not None:
            activated.setblocking(False)
            self._servers.append(await loop.create_unix_server(self._paused, sock=activated))
            addresses.append(f"frames+unix:{activated.getsockname()} (socket-activated)")
        if unix_path is not None:
            previous = os.umask(0o117)  # never, even briefly, reachable by others
            try:
                self._servers.append(await loop.create_unix_server(self._paused, str(unix_path)))
            finally:
                os.umask(previous)
            os.chmod(unix_path, 0o660)
            self._unix_paths.append(unix_path)
            addresses.append(f"frames+unix:{unix_path}")
        if tcp_address:
            host, _, port = tcp_address.rpartition(":")
            self._servers.append(await loop.create_server(self._paused, host, int(port)))
            addresses.append(f"frames+tcp:{tcp_address}")
        return addresses

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=30)
        for path in self._unix_paths:
            path.unlink(missing_ok=True)

    def _paused(self) -> _Accepted:
        return _Accepted(self._handle)

    async def _handle(self, transport: asyncio.Transport) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        writer: asyncio.StreamWriter | None = None
        try:
            admitted = await self._admit(transport)
            if admitted is not None:
                reader, writer, peer, server, where = admitted
                await self._relay(reader, _HostFrames(writer), peer, server, where)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            log.debug("a relay connection broke", error=str(exc))
        except asyncio.CancelledError:
            pass  # stopping, or let go for a newer connection; a session closed on the way
        except Exception as exc:
            if self._refusals.due(("frames-fault", type(exc).__name__)) is not None:
                log.warning("a relay connection failed", error=type(exc).__name__)
        finally:
            if task is not None:
                self._connections.discard(task)
            if writer is None:
                transport.abort()
            else:
                writer.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(writer.wait_closed(), 5)

    async def _tls(
        self, transport: asyncio.Transport
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The TLS handshake on an accepted connection, as asyncio streams."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_BUFFER)
        protocol = _TlsStreamProtocol(reader)
        secure = await asyncio.wait_for(
            loop.start_tls(
                transport,
                protocol,
                self._context,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_SECONDS,
            ),
            HANDSHAKE_SECONDS + 1,
        )
        if secure is None:
            raise ConnectionError("the connection ended during the TLS handshake")
        protocol.connection_made(secure)
        return reader, asyncio.StreamWriter(secure, protocol, reader, loop)

    async def _admit(
        self, transport: asyncio.Transport
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, PeerCertificate, str, str] | None:
        """Handshake, authenticate, read `open`; None if refused (said, and audited)."""
        where = _peer(transport)
        kind, source = _source(transport)
        if kind == "tcp" and self._pending_by_source.get(source, 0) >= PENDING_PER_ADDRESS:
            await self._deny(
                f"more than {PENDING_PER_ADDRESS} connections from one address not yet opened",
                where,
            )
            return None
        waiting = self._pending[kind]
        now = asyncio.get_running_loop().time()
        if len(waiting) >= PENDING_LIMIT:
            began, oldest = waiting[0]
            if now - began < IDLE_SECONDS:  # a burst of live handshakes: this one waits not
                await self._deny("too many connections not yet opened", where)
                return None
            waiting.pop(0)
            oldest.cancel()  # idle (a handshake is done in milliseconds): let go for this one
            if self._refusals.due(("frames-busy", kind)) is not None:
                log.warning("idle relay connections let go: too many not yet opened")
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - a connection's handler runs as a task
        entry = (now, task)
        waiting.append(entry)
        self._pending_by_source[source] = self._pending_by_source.get(source, 0) + 1
        try:
            try:
                reader, writer = await self._tls(transport)
            except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
                await self._deny(handshake_reason(exc), where)
                return None
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            pem = ssl.DER_cert_to_PEM_cert(der).encode() if der else None
            host = _HostFrames(writer)
            try:
                roles = METHOD_RULES[RELAY_METHOD]
                peer = check_certificate(pem, self._authority, roles, RELAY_METHOD)
            except Denied as exc:
                await self._deny(str(exc), where, pem)
                await host.error(exc.code.name.lower(), str(exc))
                await _linger(reader)
                return None
            server = await self._read_open(reader, host)
            return None if server is None else (reader, writer, peer, server, where)
        finally:
            if entry in waiting:
                waiting.remove(entry)
            left = self._pending_by_source[source] - 1
            if left:
                self._pending_by_source[source] = left
            else:
                del self._pending_by_source[source]

    async def _read_open(self, reader: asyncio.StreamReader, host: _HostFrames) -> str | None:
        """The server the first frame opens; an error frame and None if it is not `open`."""
        try:
            frame = await asyncio.wait_for(frames.read_frame(reader, self._max), OPEN_SECONDS)
            if frame is None:
                return None
            if frame.kind != frames.OPEN:
                raise FrameError(frames.BAD_FRAME, "the first frame must be `open` naming a server")
            fields = frame.fields()
            server, options = fields.get("server"), fields.get("options") or {}
            if not isinstance(server, str) or not server:
                raise FrameError(frames.BAD_FRAME, "`open` must name a server")
            if not isinstance(options, dict) or options:
                shown = ", ".join(sorted(options)) if isinstance(options, dict) else "?"
                raise FrameError(frames.BAD_FRAME, f"unknown session options: {capped(shown)}")
            if set(fields) - {"server", "options"}:
                raise FrameError(frames.BAD_FRAME, "`open` has members other than server, options")
        except TimeoutError:
            await host.error(frames.TIMEOUT, f"no `open` frame within {OPEN_SECONDS:g} s")
            return None
        except FrameError as exc:
            await host.error(exc.code, str(exc))
            await _linger(reader)
            return None
        return server

    async def _deny(self, reason: str, where: str, pem: bytes | None = None) -> None:
        """Audit a refused connection: once per window per (identity, reason), with a count."""
        identity = subject = None
        if pem:
            subject = capped(subject_of(pem))
            with contextlib.suppress(IdentityError, ValueError):
                identity = peer_from_pem(pem).identity.uri
        count = self._refusals.due(("frames-refused", identity or "", reason))
        if count is None:
            return
        log.warning("refused a relay connection", reason=reason, peer=where, refusals=count)
        with contextlib.suppress(AuditUnavailable):  # refused either way
            await self._audit.record(
                "access",
                durable=True,
                outcome="deny",
                action=RELAY_METHOD,
                transport=TRANSPORT,
                reason=reason,
                identity=identity or "",  # empty: no certificate could be read
                peer=where,
                detail={"subject": subject or "", "refusals": count},
            )

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        host: _HostFrames,
        peer: PeerCertificate,
        server: str,
        where: str,
    ) -> None:
        if not self._streams.take():
            await host.error(frames.QUOTA, self._streams.refusal())
            return
        try:
            with log_context(identity=peer.identity.uri):
                opening = asyncio.ensure_future(
                    self._opener.open(
                        server,
                        peer.identity.uri,
                        host.message,
                        transport=TRANSPORT,
                        peer=where,
                        credential=f"cert:{peer.serial}",
                    )
                )
                try:
                    session = await _unless_gone(opening, reader)
                except OpenRefused as exc:
                    await host.error(ERROR_CODES[exc.refusal], str(exc))
                    return
                except HostGone:
                    log.info("host left before its session opened; not opened")
                    return
                # A revocation while the session was being opened found nothing to end.
                if peer.serial in self._authority.revoked and not session.revoked.done():
                    session.revoked.set_result(f"certificate {peer.serial} has been revoked")
                with log_context(session=session.id, server=server):
                    await self._serve(reader, host, session)
        finally:
            self._streams.give_back()

    async def _serve(
        self, reader: asyncio.StreamReader, host: _HostFrames, session: HostSession
    ) -> None:
        """Pump the host's frames until it ends, the server ends, or the caller is revoked."""
        pump: asyncio.Task[bool] | None = None
        reason = "the stream broke"
        try:
            await host.frame(
                frames.control(
                    frames.OPENED,
                    session_id=session.id,
                    instance=session.instance,
                    max_message_bytes=self._max,
                )
            )
            pump = asyncio.create_task(self._pump(reader, session))
            waiting: set[asyncio.Future[Any]] = {pump, session.ended, session.revoked}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if session.revoked.done():
                reason = session.revoked.result()
                await host.error(frames.REVOKED, reason)
            elif session.ended.done():
                report = session.ended.result()
                reason = f"server {session.record.server!r} {report.describe()}"
                await host.frame(
                    frames.control(frames.CLOSED, reason=reason, exit_code=report.exit_code)
                )
            else:
                try:
                    ended = pump.result()
                except FrameError as exc:
                    reason = f"refused a frame: {exc}"
                    await host.error(exc.code, str(exc))
                    return
                if not ended:
                    reason = "the host went away"
                    return
                # The host sent its last message; deliver the answers it still awaits.
                await session.drain(self._drain_seconds)
                reason = "host ended its stream"
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, FrameError, ConnectionError):
                    await pump
            await session.close(reason)

    async def _pump(self, reader: asyncio.StreamReader, session: HostSession) -> bool:
        """The host's messages into the session; True at its `end` frame, False at EOF.

        Pulled, not queued: while the session is busy (a slow server) nothing is read, and
        TCP flow control slows the host down.
        """
        while (frame := await frames.read_frame(reader, self._max)) is not None:
            if frame.kind == frames.END:
                return True
            if frame.kind != frames.MESSAGE:
                raise FrameError(frames.BAD_FRAME, "only `message` and `end` may follow `open`")
            await session.from_host(frame.payload)
        return False


class _Accepted(asyncio.Protocol):
    """A new connection, its reading paused until TLS takes over.

    Bytes read before `start_tls` replaces this protocol would be lost to TLS (a ClientHello
    that arrives before the handler runs): paused, they wait in the kernel.
    """

    def __init__(self, handle: Callable[[asyncio.Transport], Coroutine[Any, Any, None]]) -> None:
        self._handle = handle
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream server's
        transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._handle(transport))


class _TlsStreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, without asking to keep a half-closed TLS stream open
    (asyncio's TLS cannot, and logs a warning for every session ended by the host)."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class HostGone(Exception):
    """The host closed its connection while its session was being opened."""


GONE_POLL_SECONDS = 0.25


async def _unless_gone(
    opening: asyncio.Future[HostSession], reader: asyncio.StreamReader
) -> HostSession:
    """The session `opening` makes, unless the host leaves first: then the open is
    cancelled (a host that opens and leaves at once does not make a sandbox start, nor
    hold a place at the start gate, for nobody). A host sends nothing before `opened`, so
    the end of its stream is all there is to see."""
    while True:
        done, _ = await asyncio.wait({opening}, timeout=GONE_POLL_SECONDS)
        if done:
            return opening.result()
        if reader.at_eof() or reader.exception() is not None:
            opening.cancel()
            try:
                session = await opening
            except (asyncio.CancelledError, Exception):
                raise HostGone from None  # cancelled in time, or it failed anyway
            await session.close("the host left before its session opened")  # just made it
            raise HostGone


async def _linger(reader: asyncio.StreamReader) -> None:
    """Let the caller read a refusal: closing with its bytes unread would reset a TCP
    connection and lose the error frame. Bounded: 64 KiB or half a second."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError, ssl.SSLError):
        await asyncio.wait_for(reader.read(64 * 1024), 0.5)


def _source(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(socket kind, who): the peer's user id on a Unix socket, its address over TCP."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return "tcp", f"ip:{name[0]}"
    sock = transport.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return "unix", f"uid:{struct.unpack('3i', creds)[1]}"
    except (AttributeError, OSError):
        return "unix", "uid:?"


def _peer(transport: asyncio.BaseTransport) -> str:
    """The caller's address as the audit records it (gRPC's style: unix:PATH, ipv4:HOST:PORT)."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"ipv{6 if ':' in str(name[0]) else 4}:{name[0]}:{name[1]}"
    return f"unix:{transport.get_extra_info('sockname') or ''}"
