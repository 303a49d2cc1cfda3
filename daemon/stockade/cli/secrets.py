"""`stockade secret set|rotate|ls|rm`: secrets in the daemon's vault.

Values go in only: from stdin or a file, never from the command line (where `ps` would show
them), and no command ever prints one back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stockade import exitcodes
from stockade.cli.channel import CliError, as_dict, call_control, with_socket
from stockade.v1 import control_pb2


def _secret_value(args: argparse.Namespace) -> bytes:
    """The value from --from-file or stdin; never from the command line (ps would show it)."""
    if args.from_file:
        try:
            value = Path(args.from_file).read_bytes()
        except OSError as exc:
            raise CliError(
                f"cannot read {args.from_file}: {exc.strerror}", exitcodes.USAGE
            ) from None
    else:
        if sys.stdin.isatty():
            print(f"value for {args.name} (then Ctrl-D):", file=sys.stderr)
        value = sys.stdin.buffer.read()
    # A trailing CR/LF (`echo`, editors) is removed where values enter the store, which
    # says so: the daemon sees the value as given.
    if not value.rstrip(b"\r\n"):
        raise CliError(
            "the secret is empty (give it on stdin or with --from-file)", exitcodes.USAGE
        )
    return value


def _set_secret(args: argparse.Namespace, rotate: bool) -> int:
    request = control_pb2.SetSecretRequest(name=args.name, value=_secret_value(args), rotate=rotate)
    info = call_control(args, lambda stub: stub.SetSecret(request, timeout=30))
    verb = "rotated" if rotate else "stored"
    print(f"{verb} secret {info.name} (version {info.version}, {info.backend} backend)")
    if info.line_ending_stripped:
        print(
            "note: removed a trailing line ending (CR/LF) from the value; secrets are stored "
            "without one",
            file=sys.stderr,
        )
    return exitcodes.OK


def cmd_secret_set(args: argparse.Namespace) -> int:
    return _set_secret(args, rotate=False)


def cmd_secret_rotate(args: argparse.Namespace) -> int:
    return _set_secret(args, rotate=True)


def cmd_secret_ls(args: argparse.Namespace) -> int:
    listed = call_control(
        args, lambda stub: stub.ListSecrets(control_pb2.ListSecretsRequest(), timeout=30)
    )
    if args.json:
        print(json.dumps([as_dict(i) for i in listed.secrets]))
        return exitcodes.OK
    for info in listed.secrets:
        print(
            f"{info.name}  backend={info.backend}  created={info.created}  "
            f"rotated={info.rotated}  version={info.version}"
        )
    return exitcodes.OK


def cmd_secret_rm(args: argparse.Namespace) -> int:
    request = control_pb2.RemoveSecretRequest(name=args.name)
    call_control(args, lambda stub: stub.RemoveSecret(request, timeout=30))
    print(f"removed secret {args.name}")
    return exitcodes.OK


def add_secret_parsers(sub: Any) -> None:
    secret = sub.add_parser("secret", help="secrets in the daemon's vault (values go in only)")
    actions = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    for name, handler, text, example in (
        ("set", cmd_secret_set, "store a new secret", "stockade secret set github-token < token"),
        (
            "rotate",
            cmd_secret_rotate,
            "replace a secret's value (new instances get it)",
            "stockade secret rotate github-token --from-file new-token",
        ),
    ):
        parser = actions.add_parser(name, help=text, epilog=f"example: {example}")
        parser.add_argument("name", metavar="NAME")
        parser.add_argument("--from-file", help="read the value from this file (else stdin)")
        with_socket(parser, json_flag=False)
        parser.set_defaults(handler=handler)
    ls = actions.add_parser(
        "ls", help="names, backend and times (never values)", epilog="example: stockade secret ls"
    )
    with_socket(ls)
    ls.set_defaults(handler=cmd_secret_ls)
    rm = actions.add_parser("rm", help="remove a secret", epilog="example: stockade secret rm x")
    rm.add_argument("name", metavar="NAME")
    with_socket(rm, json_flag=False)
    rm.set_defaults(handler=cmd_secret_rm)
