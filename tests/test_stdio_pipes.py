"""A session's own stdio server speaks over two named pipes (sandbox/stdio_pipes.py), not
through the engine: the messages flow, the engine carries none of them, the server cannot
touch its pipes' folder, its stderr and its end still arrive, the folder goes with the
instance (and with a crashed daemon's), and what does not fit keeps the attach socket."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import docker
import pytest

from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.runtime import Attachment
from stockade.sandbox.spec import LABEL_INSTANCE
from stockade.sandbox.stdio_pipes import CONTAINER_DIR, PipedStdio
from tests.daemon_helper import Daemon, HostSession, running_daemon, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

# A server that answers `probe` with what it could do to its pipes' folder, then `exit`s
# with code 3 when asked (its stderr says so first).
PROBE_SERVER = r"""
import json, os, sys
def attempt(what, action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return os.strerror(exc.errno)
folder = "/run/stockade-io"
for line in sys.stdin:
    message = json.loads(line)
    if message.get("method") == "initialize":
        result = {"protocolVersion": "2025-06-18", "capabilities": {},
                  "serverInfo": {"name": "probe", "version": "1"}}
    elif message.get("method") == "probe":
        result = {
            "create": attempt("create", lambda: open(folder + "/x", "w")),
            "unlink": attempt("unlink", lambda: os.unlink(folder + "/in")),
            "chmod": attempt("chmod", lambda: os.chmod(folder + "/out", 0o666)),
            "rename": attempt("rename", lambda: os.rename(folder + "/in", folder + "/y")),
            "list": attempt("list", lambda: os.listdir(folder)),
            "stdin": os.readlink("/proc/self/fd/0"),
            "stdout": os.readlink("/proc/self/fd/1"),
        }
    elif message.get("method") == "exit":
        sys.stderr.write("probe: leaving with code 3\n")
        sys.stderr.flush()
        sys.exit(3)
    else:
        continue
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}))
    sys.stdout.write("\n")
    sys.stdout.flush()
"""


def probe_once(daemon: Daemon, server: str) -> Any:
    """Open a session, ask `probe`, close it: the answer."""

    async def scenario() -> Any:
        async with HostSession(daemon, server) as session:
            return await session.request("probe", {})

    return asyncio.run(scenario())


def instance_folders(root: Path, daemon: Daemon) -> list[str]:
    folder = root / daemon.daemon_id
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def container_of(instance: str) -> dict[str, Any]:
    client = docker.from_env()
    (found,) = client.api.containers(all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"})
    details: dict[str, Any] = client.api.inspect_container(found["Id"])
    return details


def test_a_sessions_server_speaks_over_its_pipes_and_cannot_touch_them(tmp_path: Path) -> None:
    pipes = tmp_path / "io"
    with running_daemon(tmp_path / "d", STOCKADE_STDIO_PIPES_DIR=str(pipes)) as daemon:
        daemon.add_script_server("probe", PROBE_SERVER, "--warm", "0")

        async def scenario() -> tuple[Any, str, list[str], dict[str, Any], bytes, Any]:
            async with HostSession(daemon, "probe") as session:
                assert session.opened is not None
                instance = session.opened.instance
                answer = await session.request("probe", {})
                folders = instance_folders(pipes, daemon)
                details = container_of(instance)
                logged = docker.from_env().api.logs(details["Id"], stdout=True, stderr=False)
                await session.send("exit")
                await session.wait_for(lambda: session.closed is not None, 30)
                return answer, instance, folders, details, logged, session.closed

        answer, instance, folders, details, logged, closed = asyncio.run(scenario())
        wait_until(
            lambda: instance not in instance_folders(pipes, daemon), 30, "its folder removed"
        )
    result = answer["result"]
    # The server's stdio are the pipes; the engine saw none of its answers.
    assert result["stdin"] == f"{CONTAINER_DIR}/in" and result["stdout"] == f"{CONTAINER_DIR}/out"
    assert logged == b""
    assert folders == [instance]
    mounts = [m for m in details["Mounts"] if m["Destination"] == CONTAINER_DIR]
    assert len(mounts) == 1 and mounts[0]["RW"] is False
    assert mounts[0]["Source"] == str(pipes / daemon.daemon_id / instance)
    # Its own folder is read-only to it, and it cannot even list it.
    assert {k: result[k] for k in ("create", "unlink", "chmod", "rename")} == dict.fromkeys(
        ("create", "unlink", "chmod", "rename"), "Read-only file system"
    )
    assert result["list"] == "Permission denied"
    # Its end still arrives, with its code, and its stderr was still heard.
    assert closed is not None and closed.exit_code == 3
    assert "probe: leaving with code 3" in daemon.log_path.read_text()


def test_shared_servers_a_switched_off_setting_and_no_folder_keep_the_attach_socket(
    tmp_path: Path,
) -> None:
    pipes = tmp_path / "io"
    with running_daemon(tmp_path / "d", STOCKADE_STDIO_PIPES_DIR=str(pipes)) as daemon:
        daemon.add_script_server("probe-shared", PROBE_SERVER, "--shared")
        wait_until(
            lambda: daemon.status("probe-shared").get("instances") == 1, 60, "the shared one"
        )
        answer = probe_once(daemon, "probe-shared")
        assert "result" in answer, answer
        assert answer["result"]["stdout"].startswith("pipe:")  # the engine's own pipe
        assert instance_folders(pipes, daemon) == []
    with running_daemon(
        tmp_path / "e", STOCKADE_STDIO_PIPES_DIR=str(pipes), STOCKADE_STDIO_PIPES="false"
    ) as daemon:
        daemon.add_script_server("probe", PROBE_SERVER, "--warm", "0")
        answer = probe_once(daemon, "probe")
        assert answer["result"]["stdout"].startswith("pipe:")
        assert instance_folders(pipes, daemon) == []
    # A folder that cannot be made (here: under a file): the attach socket, said once.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with running_daemon(tmp_path / "f", STOCKADE_STDIO_PIPES_DIR=str(blocked / "io")) as daemon:
        daemon.add_script_server("probe", PROBE_SERVER, "--warm", "0")
        answer = probe_once(daemon, "probe")
        assert answer["result"]["stdout"].startswith("pipe:")
        assert daemon.log_path.read_text().count("stdio pipes unavailable") == 1


def test_pipes_left_by_a_killed_daemon_are_removed_at_its_next_start(tmp_path: Path) -> None:
    pipes = tmp_path / "io"
    with running_daemon(tmp_path / "d", STOCKADE_STDIO_PIPES_DIR=str(pipes)) as daemon:
        daemon.add_script_server("probe", PROBE_SERVER, "--warm", "2")
        wait_until(lambda: len(instance_folders(pipes, daemon)) == 2, 60, "a pool of two")
        left = instance_folders(pipes, daemon)
        daemon.kill9()
        assert instance_folders(pipes, daemon) == left  # a crash leaves them
        daemon.start()
        wait_until(lambda: len(instance_folders(pipes, daemon)) == 2, 60, "a new pool")
        assert not set(left) & set(instance_folders(pipes, daemon))  # the old ones are gone


def test_a_server_that_closes_its_stdout_has_not_ended_until_its_container_has(
    tmp_path: Path,
) -> None:
    """Red-team finding: the end of the stdout pipe was taken for the container's end, and
    the engine was asked how a container still running ended (a `docker wait` holding one
    of the few engine threads for 30 s; six such servers stalled every other start). Only
    the attach stream's end (the container's) ends the output now."""
    folder = tmp_path / "io"
    folder.mkdir()
    for name in ("in", "out"):
        os.mkfifo(folder / name, 0o600)
    engine_side, ours = socket.socketpair()

    async def scenario() -> tuple[list[Any], bool, list[Any]]:
        attached = await AttachedStdio.open(
            Attachment(sock=ours, _keep=ours), 1 << 20, lambda _line: None
        )
        stdio = await PipedStdio.open(attached, folder, 1 << 20)
        server_stdout = os.open(folder / "out", os.O_WRONLY | os.O_NONBLOCK)
        os.write(server_stdout, b'{"jsonrpc":"2.0","method":"said"}\n')
        os.close(server_stdout)  # the server closes its stdout and lives on
        lines = stdio.lines()
        first = [await anext(lines)]
        rest = asyncio.ensure_future(anext(lines, None))
        await asyncio.sleep(6)  # longer than the grace that used to end it
        ended_early = rest.done()
        engine_side.close()  # the container ends: its attach stream with it
        last = [await asyncio.wait_for(rest, 10)]
        await stdio.close()
        return first, ended_early, last

    first, ended_early, last = asyncio.run(scenario())
    assert first == [b'{"jsonrpc":"2.0","method":"said"}']
    assert not ended_early
    assert last == [None]
