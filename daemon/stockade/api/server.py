"""Build the daemon's gRPC server: listeners, message limits, authentication, servicers.

Every listener requires a client certificate from the daemon's CA (mTLS); there is no
insecure port and no setting for one. The Unix socket is 0660 in a 0750 directory:
file permissions are a second layer on top of the certificate, not a replacement.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc

from stockade.api.auth import AuthInterceptor
from stockade.api.control import ControlServicer
from stockade.api.frames import FramedRelay, server_context
from stockade.api.relay import RelayServicer
from stockade.api.streams import StreamBudget
from stockade.audit.log import AuditLog
from stockade.config import Settings
from stockade.paths import relay_socket_path
from stockade.pki.authority import CertificateAuthority
from stockade.pki.server_cert import server_certificate
from stockade.pki.tokens import TokenIssuer
from stockade.registry import Registry
from stockade.relay.opening import SessionOpener
from stockade.secrets.model import SecretStore
from stockade.supervisor.supervisor import Supervisor
from stockade.v1 import control_pb2_grpc, relay_pb2_grpc

# The Control API's own budget: gRPC's limit is the relay's plus this, and the relay
# refuses streams past its own, so these are always left for admins.
CONTROL_CONCURRENT_RPCS = 32


class ListenerError(Exception):
    """A listener could not be set up; the message says which and why."""


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory (0750) and clear a stale socket file, never anything else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o750)  # noqa: S103 - group may reach the socket; mTLS still applies
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()


def grpc_message_limit(max_message_bytes: int) -> int:
    """gRPC's own frame limit, above the JSON-RPC limit: a message between the two gets a
    JSON-RPC error and the session survives; only a frame past this one ends the stream."""
    return 2 * max_message_bytes + 1024 * 1024


def server_credentials(
    settings: Settings, authority: CertificateAuthority
) -> grpc.ServerCredentials:
    key_path, cert_path = server_certificate(settings, authority)
    return grpc.ssl_server_credentials(
        [(key_path.read_bytes(), cert_path.read_bytes())],
        root_certificates=authority.ca_pem,
        require_client_auth=True,
    )


async def start_server(
    settings: Settings,
    registry: Registry,
    supervisor: Supervisor,
    authority: CertificateAuthority,
    opener: SessionOpener,
    *,
    audit: AuditLog,
    secrets: SecretStore,
    tokens: TokenIssuer,
    streams: StreamBudget,
    unix_path: Path | None = None,
) -> tuple[grpc.aio.Server, list[str]]:
    """Listen (mTLS) on the Unix socket, `unix_path` if given (socket activation), and TCP."""
    unix_path = unix_path or settings.socket_path
    prepare_socket_path(unix_path)
    addresses = [f"unix:{unix_path}"]
    if settings.tcp_address:
        addresses.append(settings.tcp_address)
    limit = grpc_message_limit(settings.max_message_bytes)
    credentials = server_credentials(settings, authority)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(authority, audit)],
        maximum_concurrent_rpcs=settings.max_relay_streams + CONTROL_CONCURRENT_RPCS,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    relay = RelayServicer(
        opener,
        drain_seconds=settings.session_drain_seconds,
        streams=streams,
        max_message_bytes=settings.max_message_bytes,
    )
    relay_pb2_grpc.add_RelayServicer_to_server(relay, server)
    control = ControlServicer(
        addresses,
        registry,
        supervisor,
        opener,
        authority,
        audit=audit,
        secrets=secrets,
        tokens=tokens,
    )
    control_pb2_grpc.add_ControlServicer_to_server(control, server)
    # gRPC creates the socket with the process umask: bind under a tight one so that the
    # socket is never, even briefly, reachable by others.
    previous = os.umask(0o117)
    try:
        for address in addresses:
            if server.add_secure_port(address, credentials) == 0:
                raise ListenerError(f"could not listen on {address}")
        await server.start()
    finally:
        os.umask(previous)
    # The activated socket's own mode is systemd's (SocketMode=); a private one stays ours.
    os.chmod(unix_path, 0o660 if unix_path == settings.socket_path else 0o600)
    return server, addresses


async def start_framed_relay(
    settings: Settings,
    authority: CertificateAuthority,
    opener: SessionOpener,
    *,
    audit: AuditLog,
    streams: StreamBudget,
    activated: socket.socket | None = None,
) -> tuple[FramedRelay, list[str]]:
    """The framed relay (api/frames.py) next to the gRPC socket, and on `relay_tcp_address`.

    With socket activation, systemd's socket for the relay path is served instead of binding.
    """
    key_path, cert_path = server_certificate(settings, authority)
    relay = FramedRelay(
        opener,
        authority,
        audit,
        streams,
        server_context(cert_path, key_path, authority.ca_pem),
        max_message_bytes=settings.max_message_bytes,
        drain_seconds=settings.session_drain_seconds,
    )
    unix_path = None
    if activated is None:
        unix_path = relay_socket_path(settings.socket_path)
        prepare_socket_path(unix_path)
    try:
        addresses = await relay.start(unix_path, settings.relay_tcp_address, activated)
    except OSError as exc:
        await relay.stop()
        raise ListenerError(f"cannot serve the framed relay: {exc}") from None
    return relay, addresses
