"""`--from server.json`: how an MCP Registry entry maps onto `server add` (no engine needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from stockade.cli.channel import CliError
from stockade.cli.server_json import apply_server_json


def apply(
    tmp_path: Path, entry: dict[str, Any], env: dict[str, str] | None = None, *after: str
) -> tuple[argparse.Namespace, dict[str, str], dict[str, str]]:
    path = tmp_path / "server.json"
    path.write_text(json.dumps(entry))
    args = argparse.Namespace(
        name="srv", from_file=str(path), server_argv=list(after), pypi=None, npm=None, image=None
    )
    plain, secret = apply_server_json(args, env or {})
    return args, plain, secret


def package(**fields: Any) -> dict[str, Any]:
    return {"packages": [{"registryType": "pypi", "identifier": "mcp-x", **fields}]}


def test_arguments_versions_and_variables_map_onto_the_add(tmp_path: Path) -> None:
    entry = package(
        version="1.2.3",
        packageArguments=[
            {"type": "positional", "value": "/data"},
            {"type": "named", "name": "--mode", "default": "ro"},
            {"type": "named", "name": "--optional"},  # no value, not required: left out
        ],
        environmentVariables=[
            {"name": "REGION", "default": "eu"},
            {"name": "LEVEL", "isRequired": True},
            {"name": "API_KEY", "isSecret": True},
        ],
    )
    args, plain, secret = apply(tmp_path, entry, {"LEVEL": "3"}, "--verbose")
    assert args.pypi == "mcp-x==1.2.3"
    assert args.server_argv == ["/data", "--mode", "ro", "--verbose"]
    assert plain == {"REGION": "eu", "LEVEL": "3"}
    assert secret == {"API_KEY": "srv.API_KEY"}


@pytest.mark.parametrize(
    ("entry", "env", "message"),
    [
        (package(environmentVariables=[{"name": "LEVEL", "isRequired": True}]), {}, "LEVEL"),
        (package(environmentVariables=[{"name": "K", "isSecret": True}]), {"K": "x"}, "secret"),
        (package(packageArguments=[{"type": "positional", "isRequired": True}]), {}, "after --"),
        (package(transport={"type": "sse"}), {}, "not supported"),
        ({"packages": [{"registryType": "nuget", "identifier": "x"}]}, {}, "no package"),
        ({"remotes": []}, {}, "no packages"),
    ],
)
def test_what_cannot_be_honoured_is_refused(
    tmp_path: Path, entry: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(CliError, match=message):
        apply(tmp_path, entry, env)


def test_npm_oci_and_http_transport(tmp_path: Path) -> None:
    args, _, _ = apply(
        tmp_path, {"packages": [{"registryType": "npm", "identifier": "@a/b", "version": "2.0.0"}]}
    )
    assert args.npm == "@a/b@2.0.0"
    args, _, _ = apply(
        tmp_path,
        {
            "packages": [
                {
                    "registryType": "oci",
                    "identifier": "ghcr.io/acme/server",
                    "version": "1.4",
                    "transport": {"type": "streamable-http", "url": "http://localhost:8080/api"},
                }
            ]
        },
    )
    assert args.image == "ghcr.io/acme/server:1.4"
    assert (args.transport, args.port, args.path) == ("streamable-http", 8080, "/api")
