"""`stockade status`, `stockade server add|ls|inspect|rm|status|logs`, `stockade session ls`.

The daemon's servers and what runs for them: each command makes Control API calls and
prints the answer, for people or (`--json`) for scripts. A server's stderr and a session's
fields are printed through `printable`: a server chose those bytes, not the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

import grpc

from stockade import exitcodes
from stockade.cli.channel import (
    CliError,
    as_dict,
    call_control,
    connection,
    control_stub,
    rpc_error,
    with_socket,
)
from stockade.cli.server_json import apply_server_json, parse_env_options
from stockade.cli.server_show import add_show_parsers
from stockade.cli.server_sources import add_source_arguments, resolve_source
from stockade.cli.terminal import printable
from stockade.sandbox.errors import EXIT_MEANINGS
from stockade.v1 import control_pb2

UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """`256m`, `1g`, `65536` -> bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)i?b?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256m, 1g)")
    return int(match.group(1)) * UNITS[match.group(2)]


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
            f"  audit witness {printable(witness.name)}: {printable(witness.state)}"
            f" (acknowledged seq {witness.acknowledged_seq})"
        )
    for server in status.servers:
        print(f"  {server_line(server)}")
        if server.last_error:
            print(f"    {failing_line(server)}")
    return exitcodes.OK


def server_line(server: control_pb2.ServerStatus) -> str:
    health = "FAILING" if server.last_error else "ok"
    return (
        f"{server.name}: {health}, {server.instances} in use, "
        f"{server.pooled}/{server.warm_pool} warm, {server.restarts} restarts"
    )


def failing_line(server: control_pb2.ServerStatus) -> str:
    """Why a server is failing and when it is tried again (its error is the server's words)."""
    text = f"last error: {printable(server.last_error)} ({server.failures} failures in a row)"
    if server.next_retry_at:
        wait = max(0.0, server.next_retry_at - time.time())
        when = time.strftime("%H:%M:%S", time.localtime(server.next_retry_at))
        text += f"; next retry at {when} (in {wait:.0f}s)"
    return text


def trial_line(checked: control_pb2.TrialReport) -> str:
    name = printable(checked.server_name or "(unnamed)")
    version = printable(checked.server_version or "?")
    return (
        f"answered: {name} {version}, protocol {printable(checked.protocol_version or '?')}, "
        f"{checked.tools} tools, {checked.prompts} prompts, {checked.resources} resources "
        f"(trial {checked.seconds:.1f}s)"
    )


def cmd_server_add(args: argparse.Namespace) -> int:
    env = parse_env_options(args.env)
    secret_env: dict[str, str] = {}
    if args.from_file:
        env, secret_env = apply_server_json(args, env)
    image, command, server_args, source = resolve_source(args)
    if not command and (not args.image or secret_env):
        raise CliError(
            "give the server's command after --, e.g. `... -- mcp-server-time`", exitcodes.USAGE
        )
    definition = control_pb2.ServerDefinition(
        name=args.name,
        image=image,
        command=command,
        args=server_args,
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
        source=source,
        env=env,
        secret_env=secret_env,
        transport=args.transport,
        port=args.port or 0,
        path=args.path,
    )
    return register(args, definition)


def register(args: argparse.Namespace, definition: control_pb2.ServerDefinition) -> int:
    """AddServer (the daemon pins the image and runs the trial); print what answered."""
    request = control_pb2.AddServerRequest(
        server=definition,
        replace=args.replace,
        skip_check=args.no_check,
        check_timeout_seconds=args.check_timeout,
    )
    added = call_control(
        args, lambda stub: stub.AddServer(request, timeout=args.check_timeout + 60)
    )
    if args.json:
        print(json.dumps(as_dict(added)))
        return exitcodes.OK
    pinned = f", pinned {added.image_id[:19]}" if added.image_id else ""
    print(f"registered {added.name} ({added.image}{pinned}, warm pool {added.warm_pool})")
    if added.HasField("checked"):
        print(trial_line(added.checked))
    else:
        print(
            "not checked (--no-check): no trial sandbox was started, so nothing proved that "
            "the command exists or that the server answers initialize"
        )
    user = added.source.image_user
    if user in ("", "0", "root") or user.startswith(("0:", "root:")):
        print(f"note: the image's own USER is {user or 'root'}; Stockade runs it as uid 10001")
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
        print(server_line(server))
        if server.last_error:
            print(f"  {failing_line(server)}")
        for exit_record in server.recent_exits:
            when = time.strftime("%H:%M:%S", time.localtime(exit_record.at))
            how = "stopped" if exit_record.stopped_by_daemon else "exited by itself"
            notes = []
            if exit_record.oom_killed:
                notes.append("OOM-killed")
            if exit_record.pids_limit_hits:
                notes.append(f"pids limit hit {exit_record.pids_limit_hits}x")
            extra = f" ({', '.join(notes)})" if notes else ""
            meaning = EXIT_MEANINGS.get(exit_record.exit_code)
            if meaning and not exit_record.oom_killed and not exit_record.stopped_by_daemon:
                extra += f" ({meaning})"
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
                print(log_line(line), flush=True)

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
        print(session_row(session))
    return exitcodes.OK


def log_line(line: control_pb2.LogLine) -> str:
    """`INSTANCE TEXT`: one line of a server's stderr, its control characters escaped."""
    return f"{printable(line.instance)} {printable(line.line)}"


def session_row(session: control_pb2.SessionInfo) -> str:
    """One tab-separated row of `session ls`; no field can add a tab, a line or an escape."""
    since = time.strftime("%H:%M:%S", time.localtime(session.started_at))
    fields = (session.id, session.server, session.identity, session.instance)
    return "\t".join([*(printable(field) for field in fields), since])


def add_status_parser(sub: Any) -> None:
    status = sub.add_parser(
        "status", help="show the daemon's status", epilog="example: stockade status --json"
    )
    with_socket(status)
    status.set_defaults(handler=cmd_status)


def add_server_parsers(sub: Any) -> None:
    server = sub.add_parser("server", help="register and manage MCP servers")
    actions = server.add_subparsers(dest="server_command", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="register an MCP server",
        epilog="example: stockade server add time --image stockade/python -- mcp-server-time",
    )
    add.add_argument("name")
    add_source_arguments(add)
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
    add.add_argument(
        "--no-check",
        action="store_true",
        help="register without the trial sandbox (for servers that need secrets or egress "
        "not granted yet); nothing then proves the server starts",
    )
    add.add_argument(
        "--check-timeout",
        type=int,
        default=30,
        help="seconds the trial waits for initialize (default: %(default)s, at most 300)",
    )
    add.usage = (
        "stockade server add NAME (--image REF [-- COMMAND [ARGS...]] | --pypi PKG | --npm PKG"
        " [-- ARGS...]) [OPTIONS]"
    )
    with_socket(add)
    add.set_defaults(handler=cmd_server_add)

    ls = actions.add_parser(
        "ls", help="list registered servers", epilog="example: stockade server ls --json"
    )
    with_socket(ls)
    ls.set_defaults(handler=cmd_server_ls)

    inspect = actions.add_parser(
        "inspect", help="show a server's definition", epilog="example: stockade server inspect time"
    )
    inspect.add_argument("name")
    with_socket(inspect)
    inspect.set_defaults(handler=cmd_server_inspect)

    rm = actions.add_parser(
        "rm",
        help="unregister a server and stop its instances",
        epilog="example: stockade server rm time",
    )
    rm.add_argument("name")
    with_socket(rm, json_flag=False)
    rm.set_defaults(handler=cmd_server_rm)

    status = actions.add_parser(
        "status",
        help="instances, warm pool, restarts and recent exits (OOM, pids, codes)",
        epilog="example: stockade server status time",
    )
    status.add_argument("name", nargs="?")
    with_socket(status)
    status.set_defaults(handler=cmd_server_status)

    add_show_parsers(actions)

    logs = actions.add_parser(
        "logs", help="a server's stderr", epilog="example: stockade server logs time --follow"
    )
    logs.add_argument("name")
    logs.add_argument("--session", help="only this session's instance")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    with_socket(logs, json_flag=False)
    logs.set_defaults(handler=cmd_server_logs)


def add_session_parsers(sub: Any) -> None:
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
    with_socket(session_ls)
    session_ls.set_defaults(handler=cmd_session_ls)
