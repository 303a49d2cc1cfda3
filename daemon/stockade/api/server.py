"""Build the daemon's gRPC server: listeners, message limits, servicers.

The Unix socket lives in a 0700 directory and is itself 0600, so only its owner can connect
(the relay issue adds mTLS on every listener; permissions stay as a second layer).
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from stockade.api.control import ControlServicer
from stockade.api.relay import RelayServicer
from stockade.config import Settings
from stockade.registry import Registry
from stockade.supervisor.supervisor import Supervisor
from stockade.v1 import control_pb2_grpc, relay_pb2_grpc

MAX_CONCURRENT_RPCS = 256


class ListenerError(Exception):
    """A listener could not be set up; the message says which and why."""


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory (0700) and clear a stale socket file, never anything else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()


def grpc_message_limit(max_message_bytes: int) -> int:
    """gRPC's own frame limit, above the JSON-RPC limit: a message between the two gets a
    JSON-RPC error and the session survives; only a frame past this one ends the stream."""
    return 2 * max_message_bytes + 1024 * 1024


async def start_server(
    settings: Settings, registry: Registry, supervisor: Supervisor
) -> grpc.aio.Server:
    prepare_socket_path(settings.socket_path)
    address = f"unix:{settings.socket_path}"
    limit = grpc_message_limit(settings.max_message_bytes)
    server = grpc.aio.server(
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    relay = RelayServicer(
        supervisor, registry, settings.max_message_bytes, settings.stop_grace_seconds
    )
    relay_pb2_grpc.add_RelayServicer_to_server(relay, server)
    control = ControlServicer([address], registry, supervisor, relay)
    control_pb2_grpc.add_ControlServicer_to_server(control, server)
    if server.add_insecure_port(address) == 0:
        raise ListenerError(f"could not listen on {address}")
    await server.start()
    os.chmod(settings.socket_path, 0o600)
    return server
