"""`stockaded`: the long-running daemon. Load settings once, configure logging once, serve."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from stockade import __version__
from stockade.api.server import ListenerError, start_server
from stockade.cli import exitcodes
from stockade.config import Settings, SettingsError, load_settings, setting_names
from stockade.logs import configure_logging, get_logger
from stockade.registry import Registry, RegistryError
from stockade.sandbox.docker_backend import DockerBackend, EngineUnavailable
from stockade.supervisor.supervisor import Supervisor, load_daemon_id

log = get_logger("stockade.daemon")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stockaded",
        description="The Stockade daemon: runs MCP servers in sandboxes and relays their traffic.",
        epilog="example: STOCKADE_LOG_LEVEL=debug stockaded --config /etc/stockade/stockaded.toml",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default: %(default)s)")
    parser.add_argument(
        "--help-settings", action="store_true", help="list every setting and its variable"
    )
    parser.add_argument("--version", action="version", version=f"stockaded {__version__}")
    return parser.parse_args(argv)


async def _serve(settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    backend = await asyncio.to_thread(DockerBackend)
    registry = Registry(settings.state_dir)
    supervisor = Supervisor(settings, backend, registry, load_daemon_id(settings.state_dir))
    await supervisor.start()
    try:
        server = await start_server(settings, registry, supervisor)
    except BaseException:
        await supervisor.shutdown()
        raise
    log.info(
        "stockaded started",
        version=__version__,
        socket=str(settings.socket_path),
        daemon_id=supervisor.daemon_id,
        servers=len(registry.all()),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stockaded stopping")
    await server.stop(grace=settings.stop_grace_seconds)
    await supervisor.shutdown()
    settings.socket_path.unlink(missing_ok=True)
    log.info("stockaded stopped")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.help_settings:
        print("\n".join(setting_names()))
        return exitcodes.OK
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"stockaded: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(_serve(settings))
    except ListenerError as exc:
        log.error("cannot listen", error=str(exc))
        return exitcodes.FAILED
    except EngineUnavailable as exc:
        log.error("cannot start without a container engine", error=str(exc))
        return exitcodes.UNREACHABLE
    except RegistryError as exc:
        log.error("cannot load the server registry", error=str(exc))
        return exitcodes.CONFIG
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
