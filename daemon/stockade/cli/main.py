"""`stockade`: the control CLI. Parse, call, print; errors are one line saying what to do."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from stockade import __version__
from stockade.cli import exitcodes
from stockade.cli.demo import run_demo
from stockade.config import SettingsError, load_settings
from stockade.logs import configure_logging
from stockade.sandbox.docker_backend import DockerBackend, EngineUnavailable, SandboxError
from stockade.sandbox.images import ImageBuilder
from stockade.v1 import control_pb2, control_pb2_grpc

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure to report as one line, with the exit code to use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        return load_settings().socket_path
    except SettingsError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from None


def cmd_status(args: argparse.Namespace) -> int:
    path = _socket_path(args)

    async def call() -> control_pb2.Status:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = control_pb2_grpc.ControlStub(channel)
            return await stub.GetStatus(control_pb2.GetStatusRequest(), timeout=5)

    try:
        status = asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise CliError(
                f"the daemon does not answer on {path}; start it with `stockaded`",
                exitcodes.UNREACHABLE,
            ) from None
        raise CliError(f"the daemon refused: {exc.details()}", exitcodes.REFUSED) from None
    if args.json:
        print(
            json.dumps(
                {
                    "version": status.version,
                    "uptime_seconds": round(status.uptime_seconds, 3),
                    "listeners": list(status.listeners),
                }
            )
        )
    else:
        print(f"stockaded {status.version}, up {status.uptime_seconds:.0f}s")
        for listener in status.listeners:
            print(f"  listening on {listener}")
    return exitcodes.OK


def cmd_image_build(args: argparse.Namespace) -> int:
    backend = DockerBackend()
    builder = ImageBuilder(
        backend.client,
        recipes_dir=args.recipes,
        ca_bundle=args.ca_bundle,
        mirror=args.mirror,
        progress=lambda line: print(line, flush=True),
    )
    for result in builder.ensure(args.names):
        state = "built" if result.built else "up to date"
        print(f"{result.tag}: {state} (recipe {result.recipe_hash[:12]})")
    return exitcodes.OK


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.ca_bundle)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Control Stockade: sandboxed, policed, audited MCP servers.",
        epilog="example: stockade image build --ca-bundle /etc/ssl/certs/ca-certificates.crt",
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser(
        "status", help="show the daemon's status", epilog="example: stockade status --json"
    )
    status.add_argument("--socket", help="the daemon's Unix socket (default: from settings)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    image = sub.add_parser("image", help="build sandbox images")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_sub.add_parser(
        "build",
        help="build sandbox images from their recipes (skipped when up to date)",
        epilog="example: stockade image build --ca-bundle /etc/ssl/certs/ca-certificates.crt "
        "python node",
    )
    build.add_argument(
        "names",
        nargs="*",
        default=["base", "python", "node"],
        metavar="NAME",
        help="recipes to build: base, python, node (default: all)",
    )
    build.add_argument(
        "--ca-bundle",
        type=Path,
        help="CA bundle to trust during the build (TLS-intercepting proxies)",
    )
    build.add_argument("--recipes", type=Path, help="recipes folder (default: sandbox-images/)")
    build.add_argument(
        "--mirror",
        default="http://deb.debian.org/debian",
        help="Debian mirror for debootstrap (default: %(default)s)",
    )
    build.set_defaults(handler=cmd_image_build)

    demo = sub.add_parser(
        "demo",
        help="run mcp-server-time in a hardened sandbox and list its tools",
        epilog="example: stockade demo --ca-bundle /etc/ssl/certs/ca-certificates.crt",
    )
    demo.add_argument("--ca-bundle", type=Path, help="CA bundle to trust during image builds")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; ours is 1
        return exitcodes.USAGE if exc.code not in (0, None) else exitcodes.OK
    handler: Handler = args.handler
    # The CLI's own output is for people (stdout); diagnostics go to stderr, warnings and up.
    configure_logging("warning", "auto", sys.stderr)
    try:
        return handler(args)
    except CliError as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return exc.code
    except EngineUnavailable as exc:
        print(f"stockade: {exc} (run scripts/docker-engine.sh)", file=sys.stderr)
        return exitcodes.UNREACHABLE
    except (SandboxError, SettingsError) as exc:
        print(f"stockade: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    except KeyboardInterrupt:
        print("stockade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
