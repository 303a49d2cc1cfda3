"""`stockade server add` sources: --image (pulled when absent), --pypi and --npm (built).

The CLI does what needs the Docker engine and may take minutes (pulls, resolution, builds),
printing one line per step, like `stockade image build`; the daemon then pins the image
and runs the trial sandbox (`AddServer`). The sandbox modules that know Docker are
imported only when a source needs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stockade import exitcodes
from stockade.cli.channel import CliError
from stockade.v1 import control_pb2


def progress(line: str) -> None:
    print(line, flush=True)


Resolved = tuple[str, list[str], list[str], control_pb2.ServerSource | None]


def resolve_source(args: argparse.Namespace) -> Resolved:
    """(image reference, command, server arguments, provenance) for the chosen source.

    For --image everything after `--` is the command; for a package it is the arguments
    of the package's entry point (kept apart, so `server upgrade` can keep them).
    """
    if args.pypi or args.npm:
        return _build(args)
    if args.image:
        pull_if_absent(args.image)
        return args.image, list(args.server_argv), [], None
    raise CliError("give a source: --image REF, --pypi PKG or --npm PKG", exitcodes.USAGE)


def pull_if_absent(ref: str) -> None:
    """Pull `ref` when the local engine lacks it (our own images and ids never are)."""
    from stockade.sandbox.docker_backend import DockerBackend  # noqa: PLC0415
    from stockade.sandbox.errors import EngineUnavailable, ImageMissing  # noqa: PLC0415

    try:
        backend = DockerBackend()
        backend.image_info(ref)
        return
    except ImageMissing:
        pass
    except EngineUnavailable:
        return  # no engine here: the daemon checks the image and says what is missing
    if ref.startswith(("sha256:", "stockade/")):
        return  # the daemon says how to get these (`stockade image build`)
    progress(f"pulling {ref}")
    try:
        backend.pull(ref)
    except ImageMissing as exc:
        raise CliError(str(exc), exitcodes.REFUSED) from None
    progress(f"pulled {ref}")


def _build(args: argparse.Namespace) -> Resolved:
    from stockade.sandbox.docker_backend import DockerBackend  # noqa: PLC0415
    from stockade.sandbox.locks import LockError  # noqa: PLC0415
    from stockade.sandbox.server_images import BuildOptions, ServerImageBuilder  # noqa: PLC0415

    if args.ca_bundle is not None and not Path(args.ca_bundle).is_file():
        raise CliError(f"CA bundle {args.ca_bundle} is not a readable file", exitcodes.USAGE)
    kind, spec = ("pypi", args.pypi) if args.pypi else ("npm", args.npm)
    index = args.index_url if kind == "pypi" else args.registry
    options = BuildOptions(
        index=index,
        ca_bundle=args.ca_bundle,
        entrypoint=args.entrypoint,
        apt=tuple(args.apt or ()),
        allow_install_scripts=args.allow_install_scripts,
        allow_source_builds=getattr(args, "allow_source_builds", False),
    )
    builder = ServerImageBuilder(DockerBackend().client, progress)
    try:
        image = builder.ensure(args.name, kind, spec, options)
    except LockError as exc:
        raise CliError(str(exc), exitcodes.REFUSED) from None
    state = "built" if image.built else "cached"
    progress(f"{image.tag}: {state} ({image.package} {image.version})")
    source = control_pb2.ServerSource(
        kind=kind,
        package=image.package,
        version=image.version,
        lock_hash=image.lock_hash,
        recipe_hash=image.recipe_hash,
        index=index or "",
        system_packages=list(options.apt),
    )
    return image.tag, list(image.command), list(args.server_argv), source


def add_source_arguments(add: argparse.ArgumentParser) -> None:
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--image", help="an image: pulled when absent, pinned to its id at registration"
    )
    source.add_argument("--pypi", metavar="PKG[==VER]", help="a server from PyPI, built")
    source.add_argument("--npm", metavar="PKG[@VER]", help="a server from npm, built")
    source.add_argument(
        "--from",
        dest="from_file",
        metavar="SERVER.JSON",
        help="an MCP Registry server.json (pypi, npm or oci package)",
    )
    add.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="a plain environment variable (never a secret: those come from the vault)",
    )
    add.add_argument(
        "--entrypoint", help="which console script / bin to run (default: the package's own)"
    )
    add.add_argument(
        "--apt",
        action="append",
        metavar="PKG",
        help="a Debian package the server needs in its image (e.g. git); repeatable",
    )
    add.add_argument(
        "--transport",
        choices=["stdio", "streamable-http"],
        default="stdio",
        help="how the server speaks MCP inside its container (default: stdio)",
    )
    add.add_argument("--port", type=int, help="streamable-http: the port it listens on")
    add.add_argument("--path", default="/mcp", help="streamable-http: its endpoint (/mcp)")
    add.add_argument("--ca-bundle", type=Path, help="CA bundle to trust while building")
    add.add_argument("--index-url", help="PyPI index URL for --pypi")
    add.add_argument("--registry", help="npm registry URL for --npm")
    add.add_argument(
        "--allow-install-scripts",
        action="store_true",
        help="let npm run the packages' install scripts (off: npm ci --ignore-scripts)",
    )
    add.add_argument(
        "--allow-source-builds",
        action="store_true",
        help="let pip build sdists (their setup code runs); off: wheels only",
    )
