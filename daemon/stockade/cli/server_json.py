"""`stockade server add NAME --from server.json`: an MCP Registry entry, as a source.

The official format (registry schema 2025-09): `packages[]` each with `registryType`
(pypi, npm or oci), `identifier`, `version`, `transport`, `runtimeArguments`,
`packageArguments` and `environmentVariables`. The first package of a kind Stockade runs
is chosen. Mapping:

- pypi/npm/oci become --pypi NAME==VERSION, --npm NAME@VERSION or --image REF:VERSION;
- `packageArguments` become the server's arguments (positional values; named ones as
  NAME VALUE), before anything given after `--`;
- `runtimeArguments` are for npx/uvx/docker, which Stockade replaces: they are ignored,
  and the CLI says so;
- `environmentVariables` marked `isSecret` become vault secrets named `SERVER.VAR`,
  delivered by the `stockade-secret-env` shim (the daemon refuses the server until each
  is set and granted); the others take `--env NAME=VALUE`, else their value or default,
  and a required one with neither is refused.
- transport `stdio`, or `streamable-http` with a `url` naming the port and path the
  server listens on inside its container; others are refused with one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stockade import exitcodes
from stockade.cli.channel import CliError

MAX_FILE_BYTES = 1024 * 1024
KINDS = ("pypi", "npm", "oci")


def _get(item: dict[str, Any], *names: str) -> Any:
    """The first of `names` present (the schema moved from snake_case to camelCase)."""
    for name in names:
        if name in item:
            return item[name]
    return None


def _refuse(path: Path, why: str) -> CliError:
    return CliError(f"{path}: {why}", exitcodes.USAGE)


def parse_env_options(pairs: list[str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs or []:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise CliError(f"--env takes NAME=VALUE, not {pair!r}", exitcodes.USAGE)
        values[name] = value
    return values


def _arguments(path: Path, package: dict[str, Any]) -> list[str]:
    words: list[str] = []
    for argument in _get(package, "packageArguments", "package_arguments") or []:
        if not isinstance(argument, dict):
            raise _refuse(path, "packageArguments holds a non-object")
        value = _get(argument, "value", "default")
        kind = argument.get("type", "positional")
        label = argument.get("name") or _get(argument, "valueHint", "value_hint") or "?"
        if value is None:
            if _get(argument, "isRequired", "is_required"):
                raise _refuse(path, f"argument {label} needs a value: give it after --")
            continue
        if kind == "named":
            words.extend([str(argument["name"]), str(value)])
        else:
            words.append(str(value))
    return words


def _environment(
    path: Path, server: str, variables: list[Any], given: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for variable in variables:
        if not isinstance(variable, dict) or not isinstance(variable.get("name"), str):
            raise _refuse(path, "environmentVariables holds an entry without a name")
        name = variable["name"]
        if _get(variable, "isSecret", "is_secret"):
            if name in given:
                raise CliError(
                    f"{name} is a secret: store it with `stockade secret set {server}.{name}`, "
                    "never with --env",
                    exitcodes.USAGE,
                )
            secret[name] = f"{server}.{name}"
            continue
        value = given.get(name, _get(variable, "value", "default"))
        if value is None:
            if _get(variable, "isRequired", "is_required"):
                raise _refuse(path, f"variable {name} is required: give --env {name}=VALUE")
            continue
        plain[name] = str(value)
    return plain, secret


def _transport(path: Path, package: dict[str, Any], args: argparse.Namespace) -> None:
    transport = package.get("transport") or {"type": "stdio"}
    if not isinstance(transport, dict):
        raise _refuse(path, "transport is not an object")
    kind_of_transport = transport.get("type", "stdio")
    if kind_of_transport == "streamable-http":
        url = urlsplit(str(transport.get("url") or ""))
        if url.port is None:
            raise _refuse(path, "a streamable-http transport needs a url with a port")
        args.transport, args.port, args.path = "streamable-http", url.port, url.path or "/mcp"
    elif kind_of_transport != "stdio":
        raise _refuse(path, f"transport {kind_of_transport!r} is not supported (stdio, http)")


def apply_server_json(
    args: argparse.Namespace, given_env: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Set args.pypi/npm/image and the server arguments from the file; return the
    (plain, secret) environment it asks for."""
    path = Path(args.from_file)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise _refuse(path, f"larger than {MAX_FILE_BYTES} bytes")
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _refuse(path, f"cannot read it as JSON: {exc}") from None
    packages = document.get("packages") if isinstance(document, dict) else None
    if not isinstance(packages, list):
        raise _refuse(path, "no packages[] (a remote-only server cannot be sandboxed here)")
    usable = [
        p
        for p in packages
        if isinstance(p, dict) and _get(p, "registryType", "registry_type") in KINDS
    ]
    if not usable:
        raise _refuse(path, f"no package of a kind Stockade runs ({', '.join(KINDS)})")
    package = usable[0]
    kind = _get(package, "registryType", "registry_type")
    identifier = _get(package, "identifier", "name")
    version = package.get("version")
    if not isinstance(identifier, str) or not identifier:
        raise _refuse(path, "the package has no identifier")
    _transport(path, package, args)
    if _get(package, "runtimeArguments", "runtime_arguments"):
        print("note: runtimeArguments are for npx/uvx/docker; Stockade runs the package itself")
    pinned = isinstance(version, str) and version not in ("", "latest")
    if kind == "pypi":
        args.pypi = f"{identifier}=={version}" if pinned else identifier
    elif kind == "npm":
        args.npm = f"{identifier}@{version}" if pinned else identifier
    else:
        tagged = "@" in identifier or ":" in identifier.rsplit("/", 1)[-1]
        args.image = identifier if tagged or not pinned else f"{identifier}:{version}"
    args.server_argv = [*_arguments(path, package), *args.server_argv]
    variables = _get(package, "environmentVariables", "environment_variables") or []
    variables += _get(document, "environmentVariables", "environment_variables") or []
    return _environment(path, args.name, variables, given_env)
