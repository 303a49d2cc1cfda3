"""What a host or a server chose reaches the operator's terminal escaped, never obeyed.

The hostile string erases the line and returns the cursor, so that a denial of a host's
tool would read "allow get_me" on screen.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stockade.audit.chain import load_or_create_key
from stockade.audit.log import AuditLog
from stockade.cli.servers import log_line, session_row
from stockade.cli.terminal import printable
from stockade.v1 import control_pb2
from tests.daemon_helper import HostSession, running_daemon

HOSTILE = "\x1b[2K\rallow get_me"
SHOWN = "\\x1b[2K\\x0dallow get_me"
BIDI = "report\u202eexe.txt"


def stockade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "stockade"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_printable_makes_every_terminal_control_visible() -> None:
    assert printable(HOSTILE) == SHOWN
    assert printable("\x00\x07\x08\t\n\x7f\x85\x9b") == "\\x00\\x07\\x08\\x09\\x0a\\x7f\\x85\\x9b"
    assert printable(BIDI) == "report\\u202eexe.txt"
    assert printable("\u2066x\u2069\u200f\u2028") == "\\u2066x\\u2069\\u200f\\u2028"
    assert printable("lone \ud800") == "lone \\ud800"  # else printing it would crash


def test_printable_leaves_text_as_it_is() -> None:
    text = "get_current_time(Europe/Paris) é 日本 🙂 C:\\path [2K"
    assert printable(text) == text


def write_hostile_audit(folder: Path) -> Path:
    """A real audit log holding a denied call to a tool the host named `HOSTILE`."""
    log = AuditLog(folder, load_or_create_key(folder.parent / "audit-key.pem"), daemon_id="t")

    async def scenario() -> None:
        log.open()
        await log.record(
            "request",
            durable=True,
            outcome="deny",
            identity="spiffe://stockade.local/host/mallory",
            server="time",
            action="tools/call",
            target=HOSTILE,
            reason=f"no rule allows {BIDI}",
        )
        await log.close()

    asyncio.run(scenario())
    return folder


def test_audit_tail_shows_a_hostile_tool_name_escaped(tmp_path: Path) -> None:
    audit = write_hostile_audit(tmp_path / "audit")
    tail = stockade("audit", "tail", "--dir", str(audit), "--decision", "deny")
    assert tail.returncode == 0, tail.stderr
    assert "\x1b" not in tail.stdout
    assert "\r" not in tail.stdout
    assert "\u202e" not in tail.stdout
    [line] = tail.stdout.splitlines()
    assert "  deny  " in line
    assert f"target={SHOWN}" in line
    assert "reason=no rule allows report\\u202eexe.txt" in line


def test_audit_export_cef_is_escaped_and_json_stays_exact(tmp_path: Path) -> None:
    audit = write_hostile_audit(tmp_path / "audit")
    cef = stockade("audit", "export", "--format", "cef", "--dir", str(audit))
    assert cef.returncode == 0, cef.stderr
    assert "\x1b" not in cef.stdout
    assert "cs2=\\x1b[2K\\rallow get_me" in cef.stdout  # CEF writes CR as \r itself
    jsonl = stockade("audit", "tail", "--json", "--dir", str(audit), "--decision", "deny")
    assert "\x1b" not in jsonl.stdout  # JSON escapes it by itself...
    assert json.loads(jsonl.stdout)["target"] == HOSTILE  # ...and keeps the exact value


def test_an_error_quoting_a_hostile_string_is_one_escaped_line(tmp_path: Path) -> None:
    missing = tmp_path / f"{HOSTILE}\nstockade: ok"
    check = stockade(
        "policy",
        "check",
        "--policies",
        str(missing),
        "--identity",
        "host/laptop",
        "--server",
        "time",
        "--method",
        "tools/list",
    )
    assert check.returncode == 1
    assert "\x1b" not in check.stderr
    [line] = check.stderr.splitlines()
    assert line.startswith("stockade: ")
    assert f"{SHOWN}\\x0astockade: ok" in line
    lint = stockade("policy", "lint", str(missing))
    assert lint.returncode == 1
    [line] = lint.stderr.splitlines()
    assert "\x1b" not in line
    assert SHOWN in line


def test_a_server_log_line_and_a_session_row_are_escaped() -> None:
    assert log_line(control_pb2.LogLine(instance="i-1", line=HOSTILE)) == f"i-1 {SHOWN}"
    session = control_pb2.SessionInfo(
        id="s-1",
        server="time",
        identity="spiffe://stockade.local/host/a\tb\x1b]0;owned\x07",
        instance="i-1",
        started_at=time.time(),
    )
    row = session_row(session)
    assert "\x1b" not in row
    assert "\x07" not in row
    assert row.count("\t") == 4  # a field cannot add a column
    assert "host/a\\x09b\\x1b]0;owned\\x07\ti-1\t" in row


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_server_logs_show_a_servers_escapes_escaped(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        daemon.add_scratch_server("talker", "--warm", "0")

        async def scenario() -> str:
            async with HostSession(daemon, "talker") as host:
                assert host.opened
                await host.request("scratch/stderr", {"text": HOSTILE})
                return daemon.cli("server", "logs", "talker").stdout

        logs = asyncio.run(scenario())
    assert "\x1b" not in logs
    assert "\r" not in logs
    assert f" {SHOWN}" in logs
