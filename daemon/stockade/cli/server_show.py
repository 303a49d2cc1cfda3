"""`stockade server show NAME` and `stockade server upgrade NAME [--to VERSION]`.

`show` prints where a server's image came from (package and version with its lock hash,
or image and digest), the pinned image id, what answered at registration, the sandbox in
force (the registry's settings capped by policy) and the secrets granted. `upgrade`
rebuilds a package server at a new pinned version (or re-pulls an image) and registers
it again: the daemon swaps the pool only when the trial sandbox answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from stockade import exitcodes
from stockade.cli.channel import as_dict, call_control, with_socket
from stockade.cli.terminal import printable
from stockade.v1 import control_pb2

MiB = 1024 * 1024


def source_line(server: control_pb2.ServerDefinition) -> str:
    source = server.source
    if source.kind in ("pypi", "npm"):
        text = f"{source.kind} {source.package} {source.version}"
        text += f" (lock sha256:{source.lock_hash[:16]}, recipe {source.recipe_hash[:16]})"
        return text + (f" from {source.index}" if source.index else "")
    digest = source.digest or "no repository digest (built or loaded locally)"
    return f"image {server.image} ({digest})"


def show_lines(details: control_pb2.ServerDetails) -> list[str]:
    server, box = details.server, details.sandbox
    lines = [
        printable(server.name),
        f"  source:   {printable(source_line(server))}",
        f"  image:    {printable(server.image)} pinned to {server.image_id or '(not pinned)'}",
        f"  command:  {printable(' '.join([*server.command, *server.args]))}",
    ]
    if server.env:
        plain = ", ".join(f"{k}={v}" for k, v in sorted(server.env.items()))
        lines.append(f"  env:      {printable(plain)}")
    if server.secret_env:
        mapped = ", ".join(f"{k} <- {v}" for k, v in sorted(server.secret_env.items()))
        lines.append(f"  secret env (through stockade-secret-env): {printable(mapped)}")
    if server.HasField("checked"):
        checked = server.checked
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checked.at))
        lines.append(
            f"  answered: {printable(checked.server_name)} {printable(checked.server_version)}"
            f", protocol {printable(checked.protocol_version)}, {checked.tools} tools, "
            f"{checked.prompts} prompts, {checked.resources} resources (trial at {when})"
        )
    else:
        lines.append("  answered: not checked (registered with --no-check)")
    if server.source.image_user in ("", "0", "root"):
        lines.append("  user:     the image's own USER is root; it runs as the sandbox user")
    network = "egress to " + ", ".join(box.egress) if box.egress else "none"
    lines.append(
        f"  sandbox:  {box.runtime}, memory {box.memory_bytes // MiB} MiB, cpus {box.cpus:g}, "
        f"pids {box.pids_limit}, user {box.user}, network {network}, read-only root"
    )
    for mount in box.mounts:
        lines.append(f"            mount {printable(mount)}")
    if box.capabilities:
        lines.append(f"            capabilities {', '.join(box.capabilities)}")
    lines.append(f"            (policy: {printable(box.policy_source) or 'defaults'})")
    granted = ", ".join(details.secrets) or "none"
    missing = f" (missing from the vault: {', '.join(details.missing_secrets)})"
    lines.append(f"  secrets:  {granted}{missing if details.missing_secrets else ''}")
    if details.HasField("status") and details.status.last_error:
        lines.append(f"  health:   FAILING: {printable(details.status.last_error)}")
    elif details.HasField("status"):
        lines.append("  health:   ok")
    return lines


def cmd_server_show(args: argparse.Namespace) -> int:
    request = control_pb2.GetServerRequest(name=args.name)
    details = call_control(args, lambda stub: stub.ShowServer(request, timeout=10))
    if args.json:
        print(json.dumps(as_dict(details)))
    else:
        print("\n".join(show_lines(details)))
    return exitcodes.OK


def cmd_server_upgrade(args: argparse.Namespace) -> int:
    from stockade.cli.server_sources import pull_if_absent, resolve_source  # noqa: PLC0415
    from stockade.cli.servers import register  # noqa: PLC0415

    request = control_pb2.GetServerRequest(name=args.name)
    current = call_control(args, lambda stub: stub.GetServer(request, timeout=10))
    kind = current.source.kind or "image"
    upgraded = control_pb2.ServerDefinition()
    upgraded.CopyFrom(current)
    upgraded.ClearField("checked")
    upgraded.image_id = ""
    if kind in ("pypi", "npm"):
        separator = "==" if kind == "pypi" else "@"
        spec = current.source.package + (f"{separator}{args.to}" if args.to else "")
        args.pypi, args.npm = (spec, None) if kind == "pypi" else (None, spec)
        args.image, args.server_argv = None, []
        args.index_url = args.registry = current.source.index or None
        if args.apt is None:
            args.apt = list(current.source.system_packages)
        if args.entrypoint is None and current.command:
            args.entrypoint = current.command[0].rsplit("/", 1)[-1]
        image, command, _, source = resolve_source(args)
        assert source is not None  # noqa: S101 - a package source always has one
        upgraded.image = image
        upgraded.source.CopyFrom(source)
        del upgraded.command[:]
        upgraded.command.extend(command)
    else:
        ref = args.to or current.image
        pull_if_absent(ref)
        upgraded.image = ref
        upgraded.ClearField("source")
    args.replace = True
    return register(args, upgraded)


def add_show_parsers(actions: Any) -> None:
    show = actions.add_parser(
        "show",
        help="source, pinned image, trial answer, effective sandbox and secrets of a server",
        epilog="example: stockade server show fetch",
    )
    show.add_argument("name")
    with_socket(show)
    show.set_defaults(handler=cmd_server_show)

    upgrade = actions.add_parser(
        "upgrade",
        help="rebuild at a new pinned version; the pool changes only if the trial answers",
        epilog="example: stockade server upgrade fetch --to 2026.10.24",
    )
    upgrade.add_argument("name")
    upgrade.add_argument("--to", help="version (pypi/npm) or image reference (default: latest)")
    upgrade.add_argument("--ca-bundle", type=Path, help="CA bundle to trust while building")
    upgrade.add_argument("--entrypoint", help="console script / bin to run")
    upgrade.add_argument("--apt", action="append", metavar="PKG", help="Debian package needed")
    upgrade.add_argument("--allow-install-scripts", action="store_true")
    upgrade.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    upgrade.add_argument("--check-timeout", type=int, default=30)
    with_socket(upgrade)
    upgrade.set_defaults(handler=cmd_server_upgrade)
