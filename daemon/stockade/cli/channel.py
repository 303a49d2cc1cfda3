"""How the CLI reaches the daemon over gRPC (always mTLS), and how failures become one-line
errors. Where credentials are found: `cli/locate.py`."""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from stockade import exitcodes
from stockade.cli.errors import CliError as CliError
from stockade.cli.locate import credential_args as credential_args
from stockade.cli.locate import credential_folder, no_credentials_message
from stockade.cli.locate import user_config_dir as user_config_dir
from stockade.config import SettingsError, load_settings
from stockade.pki import SERVER_NAME
from stockade.v1 import control_pb2_grpc

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from stockade.v1.control_pb2_grpc import ControlAsyncStub

T = TypeVar("T")


@dataclass(frozen=True)
class Connection:
    target: str  # "unix:/path" or "host:port"
    cert: Path
    key: Path
    ca: Path
    max_message_bytes: int

    def channel(self) -> grpc.aio.Channel:
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(),
                private_key=self.key.read_bytes(),
                certificate_chain=self.cert.read_bytes(),
            )
        except OSError as exc:
            raise CliError(f"cannot read credentials: {exc}", exitcodes.REFUSED) from None
        limit = 2 * self.max_message_bytes + 1024 * 1024
        return grpc.aio.secure_channel(
            self.target,
            credentials,
            options=[
                # The daemon's certificate always carries this name, also on the Unix socket.
                ("grpc.ssl_target_name_override", SERVER_NAME),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (mTLS)")
    group.add_argument("--socket", help="the daemon's Unix socket (default: from settings)")
    group.add_argument("--address", help="the daemon's TCP address, HOST:PORT, instead")
    group.add_argument("--cert", type=Path, help="client certificate (default: see docs)")
    group.add_argument("--key", type=Path, help="client private key")
    group.add_argument("--ca", type=Path, help="the daemon's CA certificate")


def with_socket(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """The connection options of a command that calls the daemon, and `--json` if it prints data."""
    add_connection_options(parser)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def connection(args: argparse.Namespace, as_host: bool = False) -> Connection:
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from None
    socket_path = Path(args.socket) if args.socket else settings.socket_path
    target = args.address or f"unix:{socket_path}"
    folder = credential_folder(settings.state_dir, as_host)
    cert = args.cert or (folder / "client.crt" if folder else None)
    key = args.key or (folder / "client.key" if folder else None)
    ca = args.ca or (folder / "ca.crt" if folder else None)
    if cert is None or key is None or ca is None:
        if not args.address and not socket_path.exists():  # the more useful of two problems
            raise CliError(
                f"the daemon does not answer on {target}; start it with `stockaded`",
                exitcodes.UNREACHABLE,
            )
        raise CliError(no_credentials_message(), exitcodes.REFUSED)
    return Connection(target, cert, key, ca, settings.max_message_bytes)


def control_stub(channel: grpc.aio.Channel) -> ControlAsyncStub:
    return control_pb2_grpc.ControlStub(channel)


def listening(target: str) -> bool:
    """Whether anything accepts a plain connection at `target` (unix:/path or host:port)."""
    if target.startswith("unix:"):
        family, address = socket.AF_UNIX, target[len("unix:") :]
        probe = socket.socket(family)
        connect_to: str | tuple[str, int] = address
    else:
        host, _, port = target.rpartition(":")
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        connect_to = (host.strip("[]"), int(port))
    with probe:
        probe.settimeout(2)
        try:
            probe.connect(connect_to)
        except OSError:
            return False
    return True


def rpc_error(exc: grpc.aio.AioRpcError, target: str) -> CliError:
    """Map a gRPC failure to the documented exit codes, with what to do next."""
    code, details = exc.code(), exc.details() or ""
    refusal = _daemon_refusal(exc)
    if refusal is not None:  # the daemon's own reason: say it as it is
        exit_code = exitcodes.FAILED if refusal == "unavailable" else exitcodes.REFUSED
        return CliError(
            details if refusal == "unknown_server" else f"refused: {details}", exit_code
        )
    # gRPC reports a refused TLS handshake as UNAVAILABLE, like a daemon that is not running;
    # the listener answering a plain connection tells the two apart.
    if code is grpc.StatusCode.UNAVAILABLE and listening(target):
        return CliError(
            f"the daemon at {target} refused the TLS handshake: the client certificate is "
            "missing, expired or from another CA",
            exitcodes.REFUSED,
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(
            f"the daemon does not answer on {target}; start it with `stockaded`",
            exitcodes.UNREACHABLE,
        )
    shown, exit_code = _PLAIN_REFUSALS.get(code, ("the daemon refused: {}", exitcodes.REFUSED))
    return CliError(shown.format(details) if details else shown.format(code.name), exit_code)


_PLAIN_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: ("refused: {}", exitcodes.REFUSED),
    grpc.StatusCode.PERMISSION_DENIED: ("refused: {}", exitcodes.REFUSED),
    grpc.StatusCode.INVALID_ARGUMENT: ("{}", exitcodes.USAGE),
    grpc.StatusCode.ALREADY_EXISTS: ("{}", exitcodes.USAGE),
    grpc.StatusCode.NOT_FOUND: ("{}", exitcodes.REFUSED),
}


REFUSAL_KEY = "stockade-refusal"  # set by the daemon on its own refusals (api/relay.py)


def _daemon_refusal(exc: grpc.aio.AioRpcError) -> str | None:
    """The kind of refusal when the daemon itself refused (not the transport), else None."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:
        return None
    for key, value in metadata:
        if key == REFUSAL_KEY:
            return str(value)
    return None


def call_control(args: argparse.Namespace, rpc: Callable[[ControlAsyncStub], Awaitable[T]]) -> T:
    """Run one Control RPC against the daemon; gRPC failures become `CliError`."""
    target = connection(args)

    async def run() -> T:
        async with target.channel() as channel:
            return await rpc(control_stub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, target.target) from None


def as_dict(message: Any) -> dict[str, Any]:
    """A Control API answer as JSON-ready data, with the proto's own field names (`--json`)."""
    result: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    return result
