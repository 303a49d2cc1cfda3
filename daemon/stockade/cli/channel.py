"""How the CLI reaches the daemon, and how gRPC failures become one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from stockade.cli import exitcodes
from stockade.config import SettingsError, load_settings
from stockade.v1 import control_pb2_grpc

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from stockade.v1.control_pb2_grpc import ControlAsyncStub


class CliError(Exception):
    """A failure to report as one line, with the exit code to use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def socket_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    try:
        return load_settings().socket_path
    except SettingsError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from None


def open_channel(path: Path) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{path}")


def control_stub(channel: grpc.aio.Channel) -> ControlAsyncStub:
    return control_pb2_grpc.ControlStub(channel)


def rpc_error(exc: grpc.aio.AioRpcError, path: Path) -> CliError:
    """Map a gRPC failure to the documented exit codes, with what to do next."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(
            f"the daemon does not answer on {path}; start it with `stockaded`",
            exitcodes.UNREACHABLE,
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
        return CliError(exc.details() or "invalid request", exitcodes.USAGE)
    if code is grpc.StatusCode.NOT_FOUND:
        return CliError(exc.details() or "not found", exitcodes.REFUSED)
    return CliError(f"the daemon refused: {exc.details()}", exitcodes.REFUSED)
