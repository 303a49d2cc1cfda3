"""`stockade`: the control CLI. Parse, call, print; errors are one line saying what to do.

`cli/main.py` (the console entry point) sends `stockade connect` to `cli/bridge.py` without
loading this module, and every other command here.

This module holds only the root parser, the dispatch to a command's handler, and the mapping
of failures to exit codes (`stockade.exitcodes`). Each command group lives in its own module
with its parsers and handlers together: `servers` (status, server, session), `credentials`
(cert, client, token), `secrets`, `policy`, `audit`, `connect`, `images` (image, demo).
An error message may quote what the daemon, a server or a file said, so it is printed
through `printable`: one line, with no control character reaching the terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import argcomplete

from stockade import __version__, exitcodes
from stockade.cli.audit import add_audit_parsers
from stockade.cli.bridge import add_connect_parser
from stockade.cli.channel import CliError
from stockade.cli.credentials import add_cert_parsers, add_client_parsers, add_token_parsers
from stockade.cli.images import add_demo_parser, add_image_parsers
from stockade.cli.policy import add_policy_parsers
from stockade.cli.secrets import add_secret_parsers
from stockade.cli.servers import add_server_parsers, add_session_parsers, add_status_parser
from stockade.cli.terminal import printable
from stockade.config import SettingsError
from stockade.logs import configure_logging
from stockade.sandbox.errors import EngineUnavailable, SandboxError

Handler = Callable[[argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Control Stockade: sandboxed, policed, audited MCP servers.",
        epilog="example: stockade server add time --image stockade/python -- mcp-server-time",
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order `stockade --help` lists the commands in.
    add_status_parser(sub)
    add_server_parsers(sub)
    add_cert_parsers(sub)
    add_secret_parsers(sub)
    add_client_parsers(sub)
    add_token_parsers(sub)
    add_policy_parsers(sub)
    add_audit_parsers(sub)
    add_session_parsers(sub)
    add_connect_parser(sub)
    add_image_parsers(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Shell completion (argcomplete): answers and exits only when the shell asks, i.e.
    # after `eval "$(register-python-argcomplete stockade)"`; otherwise it does nothing.
    argcomplete.autocomplete(parser)
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is a server's command line, passed through verbatim.
    split = words.index("--") if "--" in words else len(words)
    try:
        args = parser.parse_args(words[:split])
        args.server_argv = words[split + 1 :]
    except SystemExit as exc:  # argparse exits 2 on usage errors; ours is 1
        return exitcodes.USAGE if exc.code not in (0, None) else exitcodes.OK
    handler: Handler = args.handler
    # The CLI's own output is for people (stdout); diagnostics go to stderr, warnings and up.
    configure_logging("warning", "auto", sys.stderr)
    try:
        return handler(args)
    except CliError as exc:
        print(f"stockade: {printable(exc)}", file=sys.stderr)
        return exc.code
    except EngineUnavailable as exc:
        print(f"stockade: {printable(exc)} (run scripts/docker-engine.sh)", file=sys.stderr)
        return exitcodes.UNREACHABLE
    except (SandboxError, SettingsError) as exc:
        print(f"stockade: {printable(exc)}", file=sys.stderr)
        return exitcodes.FAILED
    except KeyboardInterrupt:
        print("stockade: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
