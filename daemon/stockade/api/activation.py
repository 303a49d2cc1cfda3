"""Socket activation: accept on sockets systemd passed in, relay to the gRPC listener.

grpcio cannot serve on a listening socket it did not create, so the daemon's gRPC server
listens on a private Unix socket in the state dir (0600), and each activated socket gets a
small byte relay to it. TLS stays end to end (the relay never sees plaintext), so mTLS and
identities work as on a directly bound socket. Connections that arrived before the daemon
was ready wait in the activated socket's backlog, which is the point of activation.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from stockade.logs import get_logger

log = get_logger("stockade.api")
CHUNK = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def relay_activated(listener: socket.socket, target: Path) -> asyncio.Server:
    """Serve `listener` (AF_UNIX or TCP) by relaying each connection to `target`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(str(target))
        except OSError as exc:
            log.error("activated connection: the gRPC listener is unreachable", error=str(exc))
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, upstream_writer), _pump(upstream_reader, writer))
        finally:
            for end in (writer, upstream_writer):
                with contextlib.suppress(OSError):
                    end.close()

    listener.setblocking(False)
    if listener.family == socket.AF_UNIX:
        return await asyncio.start_unix_server(handle, sock=listener)
    return await asyncio.start_server(handle, sock=listener)


def describe(listener: socket.socket) -> str:
    name = listener.getsockname()
    if listener.family == socket.AF_UNIX:
        return f"unix:{name} (socket-activated)"
    return f"{name[0]}:{name[1]} (socket-activated)"
