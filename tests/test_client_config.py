"""Host configuration: the writers against real sample files of each host, and the whole
path a new user takes (enroll, write the config, start the host's command)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters, types

from stockade.cli.hosts import HOSTS, HostConfigError, server_entries, write_config
from tests.daemon_helper import running_daemon

DATA = Path(__file__).parent / "data" / "hosts"
SAMPLES = {
    "claude-desktop": "claude_desktop_config.json",
    "claude-code": "claude.json",
    "cursor": "cursor_mcp.json",
    "vscode": "vscode_mcp.json",
}
CONNECT = ["--socket", "/run/stockade/stockaded.sock", "--cert", "c", "--key", "k", "--ca", "a"]


@pytest.mark.parametrize("host", sorted(SAMPLES))
def test_writer_merges_into_a_real_sample_and_keeps_everything_else(
    tmp_path: Path, host: str
) -> None:
    path = tmp_path / SAMPLES[host]
    shutil.copy(DATA / SAMPLES[host], path)
    before = json.loads(path.read_text())
    form = HOSTS[host]
    entries = server_entries(form, ["time", "everything"], Path("/usr/bin/stockade"), CONNECT)
    backup = write_config(path, form, entries)
    after = json.loads(path.read_text())
    assert backup is not None and json.loads(backup.read_text()) == before
    for key in before:  # every other key survives, and every other server
        if key != form.key:
            assert after[key] == before[key]
    for name, entry in before[form.key].items():
        assert after[form.key][name] == entry
    ours = after[form.key]["time"]
    assert ours["command"] == "/usr/bin/stockade"
    assert ours["args"] == ["connect", "time", *CONNECT]
    assert ours.get("type") == form.extra.get("type")
    write_config(path, form, entries)  # idempotent: written again, the same
    assert json.loads(path.read_text()) == after


def test_a_file_with_comments_is_never_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    shutil.copy(DATA / "vscode_mcp_with_comments.json", path)
    before = path.read_bytes()
    entries = server_entries(HOSTS["vscode"], ["time"], Path("/usr/bin/stockade"), CONNECT)
    with pytest.raises(HostConfigError, match="it may hold comments"):
        write_config(path, HOSTS["vscode"], entries)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no backup, no temp file either


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_a_new_user_enrols_claude_desktop_and_its_command_works(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        daemon.add_server("time", "stockade/python:latest", "mcp-server-time", warm=1)
        enrolled = daemon.cli("client", "enroll", "claude-desktop")
        assert "enrolled spiffe://stockade.local/host/claude-desktop" in enrolled.stdout
        config = tmp_path / "claude_desktop_config.json"
        shutil.copy(DATA / "claude_desktop_config.json", config)
        written = daemon.cli(
            "client", "config", "claude-desktop", "time", "--write", "--file", str(config)
        )
        assert "wrote 1 server(s)" in written.stdout
        entry = json.loads(config.read_text())["mcpServers"]["time"]
        again = daemon.cli("client", "config", "claude-desktop", "time", check=False)
        assert json.loads(again.stdout)["mcpServers"]["time"] == entry  # print = write

        async def as_the_host_would() -> str:
            # Exactly the command the host runs, with the host's minimal environment.
            params = StdioServerParameters(command=entry["command"], args=entry["args"], env={})
            async with Client(params, mode="legacy") as client:
                answer = await client.call_tool("get_current_time", {"timezone": "UTC"})
                return "".join(c.text for c in answer.content if isinstance(c, types.TextContent))

        assert json.loads(anyio.run(as_the_host_would))["timezone"] == "UTC"
        seen = daemon.cli("audit", "tail", "--server", "time", "--decision", "allow").stdout
        assert "identity=spiffe://stockade.local/host/claude-desktop" in seen
        assert "target=get_current_time" in seen  # the call, as the walk-through promises
        missing = daemon.cli("client", "config", "cursor", "time", check=False)
        assert missing.returncode == 1
        assert "stockade client enroll cursor" in missing.stderr
