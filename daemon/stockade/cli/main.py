"""`stockade`: the control CLI. Parse, call, print; errors are one line saying what to do."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import argcomplete
import grpc
from google.protobuf.json_format import MessageToDict

from stockade import __version__
from stockade.cli import exitcodes
from stockade.cli.audit import add_audit_parsers
from stockade.cli.channel import (
    CliError,
    add_connection_options,
    connection,
    control_stub,
    credential_args,
    rpc_error,
    user_config_dir,
)
from stockade.cli.connect import run_connect
from stockade.config import SettingsError, load_settings
from stockade.logs import configure_logging
from stockade.sandbox.errors import EngineUnavailable, SandboxError
from stockade.v1 import control_pb2

if TYPE_CHECKING:
    from stockade.v1.control_pb2_grpc import ControlAsyncStub

Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T")
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """`256m`, `1g`, `65536` -> bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)i?b?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256m, 1g)")
    return int(match.group(1)) * UNITS[match.group(2)]


def call_control(args: argparse.Namespace, rpc: Callable[[ControlAsyncStub], Awaitable[T]]) -> T:
    """Run one Control RPC against the daemon; gRPC failures become `CliError`."""
    target = connection(args)

    async def run() -> T:
        async with target.channel() as channel:
            return await rpc(control_stub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, target.target) from None


def as_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    return result


# -- status ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    status = call_control(
        args, lambda stub: stub.GetStatus(control_pb2.GetStatusRequest(), timeout=5)
    )
    if args.json:
        print(json.dumps(as_dict(status)))
        return exitcodes.OK
    print(f"stockaded {status.version}, up {status.uptime_seconds:.0f}s")
    for listener in status.listeners:
        print(f"  listening on {listener}")
    print(f"  audit: {status.audit_state} ({status.audit_records} records)")
    print(f"  audit key fingerprint: {status.audit_key_fingerprint}")
    for witness in status.audit_witnesses:
        print(
            f"  audit witness {witness.name}: {witness.state}"
            f" (acknowledged seq {witness.acknowledged_seq})"
        )
    for server in status.servers:
        print(
            f"  {server.name}: {server.instances} in use, {server.pooled}/{server.warm_pool} warm"
            f", {server.restarts} restarts"
        )
    return exitcodes.OK


# -- servers --------------------------------------------------------------------------


def cmd_server_add(args: argparse.Namespace) -> int:
    command = list(args.server_argv)
    if not command:
        raise CliError(
            "give the server's command after --, e.g. `... -- mcp-server-time`", exitcodes.USAGE
        )
    definition = control_pb2.ServerDefinition(
        name=args.name,
        image=args.image,
        command=command,
        working_dir=args.workdir or "",
        sandbox=control_pb2.SandboxSettings(
            runtime=args.runtime,
            memory_bytes=args.memory or 0,
            cpus=args.cpus or 0.0,
            pids_limit=args.pids or 0,
        ),
        shared=args.shared,
        warm_pool=args.warm,
        restart_policy=args.restart,
    )
    request = control_pb2.AddServerRequest(server=definition, replace=args.replace)
    added = call_control(args, lambda stub: stub.AddServer(request, timeout=10))
    if args.json:
        print(json.dumps(as_dict(added)))
    else:
        print(f"registered {added.name} ({added.image}, warm pool {added.warm_pool})")
    return exitcodes.OK


def cmd_server_ls(args: argparse.Namespace) -> int:
    listed = call_control(
        args, lambda stub: stub.ListServers(control_pb2.ListServersRequest(), timeout=10)
    )
    if args.json:
        print(json.dumps([as_dict(s) for s in listed.servers]))
        return exitcodes.OK
    if not listed.servers:
        print("no servers registered; add one with `stockade server add NAME --image IMAGE -- CMD`")
    for server in listed.servers:
        mode = "shared" if server.shared else "per-session"
        runtime = server.sandbox.runtime or "runc"
        print(f"{server.name}\t{server.image}\t{' '.join(server.command)}\t{mode}\t{runtime}")
    return exitcodes.OK


def cmd_server_inspect(args: argparse.Namespace) -> int:
    request = control_pb2.GetServerRequest(name=args.name)
    server = call_control(args, lambda stub: stub.GetServer(request, timeout=10))
    print(json.dumps(as_dict(server), indent=None if args.json else 2))
    return exitcodes.OK


def cmd_server_rm(args: argparse.Namespace) -> int:
    request = control_pb2.RemoveServerRequest(name=args.name)
    call_control(args, lambda stub: stub.RemoveServer(request, timeout=60))
    print(f"removed {args.name} (its instances are stopped)")
    return exitcodes.OK


def cmd_server_status(args: argparse.Namespace) -> int:
    status = call_control(
        args, lambda stub: stub.GetStatus(control_pb2.GetStatusRequest(), timeout=5)
    )
    servers = [s for s in status.servers if not args.name or s.name == args.name]
    if args.name and not servers:
        raise CliError(f"no server named {args.name!r} is registered", exitcodes.REFUSED)
    if args.json:
        print(json.dumps([as_dict(s) for s in servers]))
        return exitcodes.OK
    for server in servers:
        print(
            f"{server.name}: {server.instances} in use, {server.pooled}/{server.warm_pool} warm, "
            f"{server.restarts} restarts"
        )
        for exit_record in server.recent_exits:
            when = time.strftime("%H:%M:%S", time.localtime(exit_record.at))
            how = "stopped" if exit_record.stopped_by_daemon else "exited by itself"
            notes = []
            if exit_record.oom_killed:
                notes.append("OOM-killed")
            if exit_record.pids_limit_hits:
                notes.append(f"pids limit hit {exit_record.pids_limit_hits}x")
            extra = f" ({', '.join(notes)})" if notes else ""
            print(f"  {when} {exit_record.instance} {how}, code {exit_record.exit_code}{extra}")
    return exitcodes.OK


def cmd_server_logs(args: argparse.Namespace) -> int:
    target = connection(args)
    request = control_pb2.GetServerLogsRequest(
        server=args.name, session=args.session or "", follow=args.follow
    )

    async def run() -> None:
        async with target.channel() as channel:
            async for line in control_stub(channel).GetServerLogs(request):
                print(f"{line.instance} {line.line}", flush=True)

    try:
        asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, target.target) from None
    return exitcodes.OK


def cmd_session_ls(args: argparse.Namespace) -> int:
    request = control_pb2.ListSessionsRequest(server=args.server or "")
    listed = call_control(args, lambda stub: stub.ListSessions(request, timeout=10))
    if args.json:
        print(json.dumps([as_dict(s) for s in listed.sessions]))
        return exitcodes.OK
    if not listed.sessions:
        print("no open sessions")
    for session in listed.sessions:
        since = time.strftime("%H:%M:%S", time.localtime(session.started_at))
        print(f"{session.id}\t{session.server}\t{session.identity}\t{session.instance}\t{since}")
    return exitcodes.OK


# -- policies (offline: these read the files, they start nothing) ----------------------


def _policy_paths(args: argparse.Namespace) -> list[Path]:
    if args.policies:
        return list(args.policies)
    try:
        return [load_settings().policy_dir]
    except SettingsError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from None


def _load_policy(paths: list[Path]) -> Any:
    from stockade.policy.loader import PolicyError, load_policy  # noqa: PLC0415

    try:
        return load_policy(paths)
    except PolicyError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None


def cmd_policy_lint(args: argparse.Namespace) -> int:
    from stockade.policy.loader import PolicyError, load_file  # noqa: PLC0415

    failed = False
    for path in args.files:
        try:
            loaded = load_file(path)
        except PolicyError as exc:
            print(f"stockade: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{path}: ok ({len(loaded.rules)} rules)")
    return exitcodes.USAGE if failed else exitcodes.OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    from stockade.pki.identity import Identity, IdentityError  # noqa: PLC0415
    from stockade.policy.evaluator import Evaluator, Request  # noqa: PLC0415

    identity = args.identity
    if not identity.startswith("spiffe://"):
        role, _, name = identity.partition("/")
        try:
            identity = Identity.make(role, name).uri
        except IdentityError as exc:
            raise CliError(
                f"--identity: {exc} (e.g. host/claude-desktop)", exitcodes.USAGE
            ) from None
    try:
        arguments = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"--args is not JSON: {exc}", exitcodes.USAGE) from None
    if not isinstance(arguments, dict):
        raise CliError("--args must be a JSON object", exitcodes.USAGE)
    evaluator = Evaluator(_load_policy(_policy_paths(args)))
    decision = evaluator.decide(Request(identity, args.server, args.method, args.name, arguments))
    if args.json:
        print(
            json.dumps(
                {
                    "allowed": decision.allowed,
                    "rule": decision.rule,
                    "source": decision.source,
                    "reason": decision.reason,
                }
            )
        )
    else:
        print("ALLOW" if decision.allowed else "DENY")
        print(
            f"  rule:   {decision.rule or '(default deny)'}"
            + (f"  [{decision.source}]" if decision.source else "")
        )
        print(f"  reason: {decision.reason}")
    return exitcodes.OK if decision.allowed else exitcodes.REFUSED


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = _load_policy(_policy_paths(args))
    shown = {
        "files": list(policy.files),
        "combining": "deny overrides; allow needs a matching rule; default deny",
        "rules": [
            {"source": r.source, **r.model_dump(mode="json", by_alias=True, exclude_defaults=False)}
            for r in policy.rules
        ],
        "server_requests": {s: sorted(m) for s, m in policy.server_requests.items()},
        "sandboxes": {
            server: {"source": sandbox.source, **sandbox.model_dump(mode="json")}
            for server, sandbox in sorted(policy.sandboxes.items())
        },
        "sandbox_default": "hardened defaults and no network for any server not listed",
    }
    print(json.dumps(shown, indent=None if args.json else 2))
    return exitcodes.OK


# -- certificates ---------------------------------------------------------------------


def cmd_cert_issue(args: argparse.Namespace) -> int:
    out: Path = args.out or Path(f"stockade-{args.identity}")
    existing = [n for n in ("client.crt", "client.key") if (out / n).exists()]
    if existing and not args.force:
        raise CliError(f"{out} already holds credentials; use --force to replace them", 1)
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


def host_credentials_dir(identity: str) -> Path:
    """Where `client enroll` writes a host's credentials (and `client config` points)."""
    return user_config_dir() / "hosts" / identity


def cmd_client_enroll(args: argparse.Namespace) -> int:
    out = host_credentials_dir(args.name)
    if (out / "client.crt").exists() and not args.force:
        raise CliError(f"{args.name} is already enrolled ({out}); use --force to renew", 1)
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


def _token_parsers(sub: Any) -> None:
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
    _with_socket(issue)
    issue.set_defaults(handler=cmd_token_issue)
    revoke = actions.add_parser(
        "revoke", help="revoke one token by id", epilog="example: stockade token revoke 3f2a9c0d1e"
    )
    revoke.add_argument("token_id", metavar="ID")
    _with_socket(revoke, json_flag=False)
    revoke.set_defaults(handler=cmd_token_revoke)


def _client_parsers(sub: Any) -> None:
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
    _with_socket(enroll, json_flag=False)
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


# -- connect, images, demo ------------------------------------------------------------


def cmd_connect(args: argparse.Namespace) -> int:
    target = connection(args, as_host=True)
    if args.listen is None:
        return run_connect(target, args.name)
    from stockade.cli.http_bridge import BridgeError, HttpBridge  # noqa: PLC0415

    if not args.front:
        raise CliError("--listen needs --front https://HOST:PORT (the daemon's http_address)", 1)
    url = f"{args.front.rstrip('/')}/servers/{args.name}/mcp"
    bridge = HttpBridge(url, target.cert, target.key, target.ca)
    print(f"serving http://{args.listen}/mcp -> {url}", file=sys.stderr)
    try:
        asyncio.run(bridge.serve(args.listen))
    except BridgeError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    except OSError as exc:
        raise CliError(
            f"cannot listen on {args.listen}: {exc.strerror}", exitcodes.FAILED
        ) from None
    return exitcodes.OK


# Commands that need docker or cryptography import them when they run: `stockade connect`
# starts once per host session and should not pay for libraries it never uses.


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


# -- parser ---------------------------------------------------------------------------


def _with_socket(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    add_connection_options(parser)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _server_parsers(sub: Any) -> None:
    server = sub.add_parser("server", help="register and manage MCP servers")
    actions = server.add_subparsers(dest="server_command", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="register an MCP server",
        epilog="example: stockade server add time --image stockade/python -- mcp-server-time",
    )
    add.add_argument("name")
    add.add_argument("--image", required=True, help="sandbox image (built locally)")
    add.add_argument(
        "--runtime",
        choices=["runc", "runsc"],
        default="runc",
        help="OCI runtime; runsc (gVisor) needs a network-less server",
    )
    add.add_argument("--memory", type=parse_size, help="memory limit, e.g. 256m")
    add.add_argument("--cpus", type=float, help="CPU limit, e.g. 0.5")
    add.add_argument("--pids", type=int, help="pids limit")
    add.add_argument("--workdir", help="working directory inside the container")
    add.add_argument(
        "--shared",
        action="store_true",
        help="one container serves every session (stateless servers only)",
    )
    add.add_argument("--warm", type=int, default=1, help="warm pool size (default: 1)")
    add.add_argument("--restart", choices=["on-failure", "never"], default="on-failure")
    add.add_argument("--replace", action="store_true", help="redefine an existing server")
    add.usage = "stockade server add NAME --image IMAGE [OPTIONS] -- COMMAND [ARGS...]"
    _with_socket(add)
    add.set_defaults(handler=cmd_server_add)

    ls = actions.add_parser(
        "ls", help="list registered servers", epilog="example: stockade server ls --json"
    )
    _with_socket(ls)
    ls.set_defaults(handler=cmd_server_ls)

    inspect = actions.add_parser(
        "inspect", help="show a server's definition", epilog="example: stockade server inspect time"
    )
    inspect.add_argument("name")
    _with_socket(inspect)
    inspect.set_defaults(handler=cmd_server_inspect)

    rm = actions.add_parser(
        "rm",
        help="unregister a server and stop its instances",
        epilog="example: stockade server rm time",
    )
    rm.add_argument("name")
    _with_socket(rm, json_flag=False)
    rm.set_defaults(handler=cmd_server_rm)

    status = actions.add_parser(
        "status",
        help="instances, warm pool, restarts and recent exits (OOM, pids, codes)",
        epilog="example: stockade server status time",
    )
    status.add_argument("name", nargs="?")
    _with_socket(status)
    status.set_defaults(handler=cmd_server_status)

    logs = actions.add_parser(
        "logs", help="a server's stderr", epilog="example: stockade server logs time --follow"
    )
    logs.add_argument("name")
    logs.add_argument("--session", help="only this session's instance")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    _with_socket(logs, json_flag=False)
    logs.set_defaults(handler=cmd_server_logs)


# -- secrets --------------------------------------------------------------------------


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
    value = value.removesuffix(b"\n")  # `echo` and editors add one; a secret rarely ends so
    if not value:
        raise CliError(
            "the secret is empty (give it on stdin or with --from-file)", exitcodes.USAGE
        )
    return value


def _set_secret(args: argparse.Namespace, rotate: bool) -> int:
    request = control_pb2.SetSecretRequest(name=args.name, value=_secret_value(args), rotate=rotate)
    info = call_control(args, lambda stub: stub.SetSecret(request, timeout=30))
    verb = "rotated" if rotate else "stored"
    print(f"{verb} secret {info.name} (version {info.version}, {info.backend} backend)")
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


def _secret_parsers(sub: Any) -> None:
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
        _with_socket(parser, json_flag=False)
        parser.set_defaults(handler=handler)
    ls = actions.add_parser(
        "ls", help="names, backend and times (never values)", epilog="example: stockade secret ls"
    )
    _with_socket(ls)
    ls.set_defaults(handler=cmd_secret_ls)
    rm = actions.add_parser("rm", help="remove a secret", epilog="example: stockade secret rm x")
    rm.add_argument("name", metavar="NAME")
    _with_socket(rm, json_flag=False)
    rm.set_defaults(handler=cmd_secret_rm)


def _cert_parsers(sub: Any) -> None:
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
    _with_socket(issue)
    issue.set_defaults(handler=cmd_cert_issue)

    revoke = actions.add_parser(
        "revoke",
        help="revoke certificates: refused from the next call on",
        epilog="example: stockade cert revoke --identity host/claude-desktop",
    )
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="one certificate")
    which.add_argument("--identity", help="every certificate of ROLE/NAME or a spiffe:// URI")
    _with_socket(revoke, json_flag=False)
    revoke.set_defaults(handler=cmd_cert_revoke)

    ls = actions.add_parser(
        "ls", help="certificates issued by this daemon", epilog="example: stockade cert ls --json"
    )
    _with_socket(ls)
    ls.set_defaults(handler=cmd_cert_ls)


def _policy_parsers(sub: Any) -> None:
    policy = sub.add_parser("policy", help="read and test access policies (offline)")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    lint = actions.add_parser(
        "lint",
        help="validate policy files; errors name file and line",
        epilog="example: stockade policy lint policies/*.yaml",
    )
    lint.add_argument("files", nargs="+", type=Path, metavar="FILE")
    lint.set_defaults(handler=cmd_policy_lint)

    check = actions.add_parser(
        "check",
        help="would this request be allowed, by which rule, and why",
        epilog="example: stockade policy check --policies policies --identity host/laptop "
        '--server time --method tools/call --name get_current_time --args \'{"timezone":"UTC"}\'',
    )
    check.add_argument("--identity", required=True, help="host/NAME, admin/NAME or a spiffe:// URI")
    check.add_argument("--server", required=True)
    check.add_argument("--method", required=True, help="e.g. tools/call, resources/read")
    check.add_argument("--name", help="tool or prompt name, or resource URI")
    check.add_argument("--args", help="the call's arguments as a JSON object")
    check.add_argument(
        "--policies",
        type=Path,
        nargs="+",
        help="policy files or folders (default: the policy_dir setting)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_policy_check)

    show = actions.add_parser(
        "show",
        help="the effective policy: every rule, in order",
        epilog="example: stockade policy show --policies policies",
    )
    show.add_argument(
        "--policies",
        type=Path,
        nargs="+",
        help="policy files or folders (default: the policy_dir setting)",
    )
    show.add_argument("--json", action="store_true", help="one line of JSON")
    show.set_defaults(handler=cmd_policy_show)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Control Stockade: sandboxed, policed, audited MCP servers.",
        epilog="example: stockade server add time --image stockade/python -- mcp-server-time",
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser(
        "status", help="show the daemon's status", epilog="example: stockade status --json"
    )
    _with_socket(status)
    status.set_defaults(handler=cmd_status)

    _server_parsers(sub)
    _cert_parsers(sub)
    _secret_parsers(sub)
    _client_parsers(sub)
    _token_parsers(sub)

    _policy_parsers(sub)
    add_audit_parsers(sub)

    session = sub.add_parser("session", help="open host sessions")
    session_actions = session.add_subparsers(
        dest="session_command", required=True, metavar="ACTION"
    )
    session_ls = session_actions.add_parser(
        "ls",
        help="open sessions: server, caller identity, instance",
        epilog="example: stockade session ls --server time",
    )
    session_ls.add_argument("--server", help="only this server's sessions")
    _with_socket(session_ls)
    session_ls.set_defaults(handler=cmd_session_ls)

    connect = sub.add_parser(
        "connect",
        help="stdio bridge for MCP hosts: use as the server command in a host's config",
        epilog="example: stockade connect time   (as a host's server command; see "
        "`stockade client config`)",
    )
    connect.add_argument("name", help="registered server to connect to")
    connect.add_argument(
        "--listen",
        help="instead of stdio, serve plain Streamable HTTP on this loopback HOST:PORT (/mcp)",
    )
    connect.add_argument(
        "--front", help="with --listen: the daemon's HTTPS front, https://HOST:PORT"
    )
    _with_socket(connect, json_flag=False)
    connect.set_defaults(handler=cmd_connect)

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
