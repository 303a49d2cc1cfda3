"""`stockade cert issue|revoke|ls`, `stockade client enroll|config`, `stockade token issue|revoke`.

Who may talk to the daemon: client certificates (mTLS, for hosts and admins), the host
configuration that uses them, and bearer tokens for hosts without a certificate. A private
key the daemon issues is written 0600 and never printed; a token goes alone to stdout, for
scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from stockade import exitcodes
from stockade.cli.channel import (
    CliError,
    as_dict,
    call_control,
    credential_args,
    user_config_dir,
    with_socket,
)
from stockade.config import load_settings
from stockade.v1 import control_pb2

# -- certificates ---------------------------------------------------------------------


def cmd_cert_issue(args: argparse.Namespace) -> int:
    out: Path = args.out or Path(f"stockade-{args.identity}")
    existing = [n for n in ("client.crt", "client.key") if (out / n).exists()]
    if existing and not args.force:
        raise CliError(
            f"{out} already holds credentials; use --force to replace them", exitcodes.USAGE
        )
    issued = _issue_to(args, args.identity, out, role=args.role)
    if args.json:
        print(json.dumps({"identity": issued.identity, "serial": issued.serial, "out": str(out)}))
    else:
        print(f"issued {issued.identity} (serial {issued.serial}, until {issued.not_after[:10]})")
        print(f"  {out}/client.crt, {out}/client.key (0600), {out}/ca.crt")
    return exitcodes.OK


def _issue_to(args: argparse.Namespace, identity: str, out: Path, role: str = "host") -> Any:
    """Issue a certificate for `identity` and write it to `out` (0600 key)."""
    from stockade.pki.authority import IssuedCertificate, write_credentials  # noqa: PLC0415

    request = control_pb2.IssueCertificateRequest(name=identity, role=role)
    issued = call_control(args, lambda stub: stub.IssueCertificate(request, timeout=10))
    write_credentials(
        out,
        IssuedCertificate(
            identity=issued.identity,
            serial=int(issued.serial),
            key_pem=issued.key_pem,
            cert_pem=issued.cert_pem,
            ca_pem=issued.ca_pem,
            not_after=datetime.fromisoformat(issued.not_after),
        ),
    )
    return issued


def cmd_cert_revoke(args: argparse.Namespace) -> int:
    request = control_pb2.RevokeCertificateRequest(
        serial=args.serial or "", identity=args.identity or ""
    )
    revoked = call_control(args, lambda stub: stub.RevokeCertificate(request, timeout=10))
    print(f"revoked {revoked.identity}: serial {', '.join(revoked.serials)}")
    return exitcodes.OK


def cmd_cert_ls(args: argparse.Namespace) -> int:
    listed = call_control(
        args, lambda stub: stub.ListCertificates(control_pb2.ListCertificatesRequest(), timeout=10)
    )
    if args.json:
        print(json.dumps([as_dict(c) for c in listed.certificates]))
        return exitcodes.OK
    for cert in listed.certificates:
        state = "REVOKED" if cert.revoked else "valid"
        print(f"{cert.serial}\t{cert.identity}\t{cert.not_after[:10]}\t{state}")
    return exitcodes.OK


def add_cert_parsers(sub: Any) -> None:
    cert = sub.add_parser("cert", help="certificates for hosts and operators (mTLS)")
    actions = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    issue = actions.add_parser(
        "issue",
        help="issue a client certificate",
        epilog="example: stockade cert issue --identity claude-desktop --out ~/.config/stockade",
    )
    issue.add_argument("--identity", required=True, help="a name, e.g. claude-desktop")
    issue.add_argument(
        "--role",
        choices=["host", "admin"],
        default="host",
        help="host: may use the relay; admin: the Control API too",
    )
    issue.add_argument("--out", type=Path, help="folder to write to (default: ./stockade-NAME)")
    issue.add_argument("--force", action="store_true", help="replace existing credentials")
    with_socket(issue)
    issue.set_defaults(handler=cmd_cert_issue)

    revoke = actions.add_parser(
        "revoke",
        help="revoke certificates: refused from the next call on",
        epilog="example: stockade cert revoke --identity host/claude-desktop",
    )
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="one certificate")
    which.add_argument("--identity", help="every certificate of ROLE/NAME or a spiffe:// URI")
    with_socket(revoke, json_flag=False)
    revoke.set_defaults(handler=cmd_cert_revoke)

    ls = actions.add_parser(
        "ls", help="certificates issued by this daemon", epilog="example: stockade cert ls --json"
    )
    with_socket(ls)
    ls.set_defaults(handler=cmd_cert_ls)


# -- MCP hosts ------------------------------------------------------------------------


def host_credentials_dir(identity: str) -> Path:
    """Where `client enroll` writes a host's credentials (and `client config` points)."""
    return user_config_dir() / "hosts" / identity


def cmd_client_enroll(args: argparse.Namespace) -> int:
    out = host_credentials_dir(args.name)
    if (out / "client.crt").exists() and not args.force:
        raise CliError(
            f"{args.name} is already enrolled ({out}); use --force to renew", exitcodes.USAGE
        )
    issued = _issue_to(args, args.name, out)
    print(f"enrolled {issued.identity} (serial {issued.serial}, until {issued.not_after[:10]})")
    print(f"  credentials in {out}; next: stockade client config HOST SERVER... --as {args.name}")
    return exitcodes.OK


def cmd_client_config(args: argparse.Namespace) -> int:
    import shutil  # noqa: PLC0415

    from stockade.cli.hosts import HOSTS, HostConfigError, server_entries, write_config  # noqa: PLC0415

    host = HOSTS[args.host]
    identity = args.as_identity or args.host
    folder = host_credentials_dir(identity)
    if not (folder / "client.crt").exists():
        raise CliError(
            f"no credentials for {identity!r} in {folder}; run `stockade client enroll {identity}`",
            exitcodes.USAGE,
        )
    stockade = Path(shutil.which("stockade") or sys.argv[0]).resolve()
    socket_path = Path(args.socket) if args.socket else load_settings().socket_path
    connect_args = ["--socket", str(socket_path), *credential_args(folder)]
    entries = server_entries(host, args.servers, stockade, connect_args)
    if not args.write:
        print(json.dumps({host.key: entries}, indent=2))
        return exitcodes.OK
    path = Path(args.file) if args.file else host.default_path()
    try:
        backup = write_config(path, host, entries)
    except HostConfigError as exc:
        raise CliError(str(exc), exitcodes.FAILED) from None
    print(
        f"wrote {len(entries)} server(s) into {path}" + (f" (backup: {backup})" if backup else "")
    )
    return exitcodes.OK


def add_client_parsers(sub: Any) -> None:
    from stockade.cli.hosts import HOSTS  # noqa: PLC0415

    client = sub.add_parser(
        "client", help="set up MCP hosts (Claude, Cursor, VS Code) to use Stockade"
    )
    actions = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    enroll = actions.add_parser(
        "enroll",
        help="issue a host certificate and store it for `client config`",
        epilog="example: stockade client enroll claude-desktop",
    )
    enroll.add_argument("name", help="the host's identity, e.g. claude-desktop")
    enroll.add_argument("--force", action="store_true", help="renew existing credentials")
    with_socket(enroll, json_flag=False)
    enroll.set_defaults(handler=cmd_client_enroll)
    config = actions.add_parser(
        "config",
        help="print (or --write) the host's MCP entry running `stockade connect`",
        epilog="example: stockade client config claude-desktop time everything --write",
    )
    config.add_argument("host", choices=sorted(HOSTS))
    config.add_argument("servers", nargs="+", metavar="SERVER")
    config.add_argument("--as", dest="as_identity", help="enrolled identity (default: HOST)")
    config.add_argument("--write", action="store_true", help="merge into the host's file")
    config.add_argument("--file", help="the host's config file (default: its usual place)")
    config.add_argument("--socket", help="the daemon's socket (default: from settings)")
    config.set_defaults(handler=cmd_client_config)


# -- bearer tokens --------------------------------------------------------------------


def cmd_token_issue(args: argparse.Namespace) -> int:
    request = control_pb2.IssueTokenRequest(
        name=args.identity, server=args.server, ttl_seconds=args.ttl
    )
    issued = call_control(args, lambda stub: stub.IssueToken(request, timeout=10))
    if args.json:
        print(json.dumps(as_dict(issued)))
        return exitcodes.OK
    print(issued.token)  # stdout: only the token, for scripts
    print(
        f"for {issued.identity} on {issued.server} until {issued.expires} "
        f"(id {issued.token_id}; revoke with `stockade token revoke {issued.token_id}`)",
        file=sys.stderr,
    )
    return exitcodes.OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    request = control_pb2.RevokeTokenRequest(token_id=args.token_id)
    call_control(args, lambda stub: stub.RevokeToken(request, timeout=10))
    print(f"revoked token {args.token_id}")
    return exitcodes.OK


def add_token_parsers(sub: Any) -> None:
    token = sub.add_parser("token", help="bearer tokens for hosts without client certificates")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    issue = actions.add_parser(
        "issue",
        help="a token for one host identity and one server, over the HTTP front",
        epilog="example: stockade token issue --identity inspector --server time --ttl 3600",
    )
    issue.add_argument("--identity", required=True, help="the host's name")
    issue.add_argument("--server", required=True, help="the only server the token is good for")
    issue.add_argument("--ttl", type=int, default=3600, help="seconds (at most 86400)")
    with_socket(issue)
    issue.set_defaults(handler=cmd_token_issue)
    revoke = actions.add_parser(
        "revoke", help="revoke one token by id", epilog="example: stockade token revoke 3f2a9c0d1e"
    )
    revoke.add_argument("token_id", metavar="ID")
    with_socket(revoke, json_flag=False)
    revoke.set_defaults(handler=cmd_token_revoke)
