"""`stockade image build` and `stockade demo`: sandbox images, and the whole path shown once.

Both talk to the Docker engine directly (no daemon needed). They import Docker only when they
run: `stockade connect` starts once per host session and should not pay for libraries it
never uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stockade import exitcodes


def cmd_image_build(args: argparse.Namespace) -> int:
    from stockade.sandbox.docker_backend import DockerBackend  # noqa: PLC0415
    from stockade.sandbox.images import ImageBuilder  # noqa: PLC0415

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
    from stockade.cli.demo import run_demo  # noqa: PLC0415

    return run_demo(args.ca_bundle)


def add_image_parsers(sub: Any) -> None:
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


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="run mcp-server-time in a hardened sandbox and list its tools",
        epilog="example: stockade demo --ca-bundle /etc/ssl/certs/ca-certificates.crt",
    )
    demo.add_argument("--ca-bundle", type=Path, help="CA bundle to trust during image builds")
    demo.set_defaults(handler=cmd_demo)
