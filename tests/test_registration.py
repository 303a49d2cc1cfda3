"""Registration tells the truth at once (issue 17): a trial sandbox before anything is kept.

A server that cannot run is refused with one line, leaving no registration and no
container; one that answers is registered with what answered; a failing pool says so in
`status`, with the exit code explained and a backed-off retry time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from stockade.sandbox.images import ImageBuilder
from tests.daemon_helper import INIT_PARAMS as INIT
from tests.daemon_helper import Daemon, HostSession, running_daemon, wait_until

PYTHON = "stockade/python:latest"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, images: ImageBuilder) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("registration")) as running:
        yield running


def refused(daemon: Daemon, name: str, *arguments: str) -> str:
    """Run a `server add` that must fail; return its one stderr line after checking the rest."""
    result = daemon.cli("server", "add", name, *arguments, check=False)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    listed = json.loads(daemon.cli("server", "ls", "--json").stdout)
    assert name not in [s["name"] for s in listed]
    assert daemon.containers() == []  # the trial's container is gone too
    return lines[0]


def test_a_missing_image_is_refused(daemon: Daemon) -> None:
    line = refused(daemon, "ghost", "--image", "stockade/nothing-here:1", "--", "x")
    assert "image 'stockade/nothing-here:1' is not present" in line


def test_a_command_the_image_lacks_is_refused(daemon: Daemon) -> None:
    line = refused(daemon, "nocmd", "--image", PYTHON, "--", "mcp-server-nowhere")
    assert "command 'mcp-server-nowhere' is not in image" in line
    assert "command not found" in line


def test_a_server_that_exits_is_refused_with_its_code_and_last_words(daemon: Daemon) -> None:
    script = "import sys; print('bad config: no API key', file=sys.stderr); sys.exit(3)"
    line = refused(daemon, "quitter", "--image", PYTHON, "--", "python3", "-c", script)
    assert "exited with code 3" in line
    assert "bad config: no API key" in line


def test_a_silent_server_is_refused_after_the_timeout(daemon: Daemon) -> None:
    script = "import time; time.sleep(120)"
    line = refused(
        daemon, "mute", "--image", PYTHON, "--check-timeout", "3", "--", "python3", "-c", script
    )
    assert "no answer to initialize within 3s" in line


def test_a_working_server_is_registered_with_what_answered(daemon: Daemon) -> None:
    added = daemon.cli(
        "server", "add", "time", "--image", PYTHON, "--warm", "0", "--", "mcp-server-time"
    )
    assert "answered: mcp-time" in added.stdout
    assert "tools, 0 prompts, 0 resources" in added.stdout
    shown = json.loads(daemon.cli("server", "inspect", "time", "--json").stdout)
    assert shown["image_id"].startswith("sha256:")
    assert shown["checked"]["server_name"] == "mcp-time"
    assert int(shown["checked"]["tools"]) >= 1
    assert daemon.containers() == []  # warm 0: the trial left nothing running
    daemon.cli("server", "rm", "time")


def test_no_check_says_what_it_skipped_and_status_shows_the_failure(daemon: Daemon) -> None:
    added = daemon.cli(
        "server", "add", "broken", "--image", PYTHON, "--no-check", "--", "mcp-server-nowhere"
    )
    assert "not checked (--no-check)" in added.stdout
    try:
        wait_until(lambda: daemon.status("broken").get("failures", 0) >= 2, 30, "two failures")
        status = daemon.status("broken")
        assert "command not found" in status["last_error"]
        assert status["next_retry_at"] > time.time() - 1
        human = daemon.cli("server", "status", "broken").stdout
        assert "broken: FAILING" in human
        assert "next retry at" in human
        overall = daemon.cli("status").stdout
        assert "broken: FAILING" in overall and "command not found" in overall
        # Backoff: 1 s doubling, so about 4 attempts in 8 s, not one every reconcile (2 s)
        # plus every pool refill.
        first = daemon.status("broken")["failures"]
        time.sleep(8)
        later = daemon.status("broken")["failures"]
        assert later - first <= 3
    finally:
        daemon.cli("server", "rm", "broken")


def test_the_pinned_image_survives_a_restart(tmp_path: Path, images: ImageBuilder) -> None:
    with running_daemon(tmp_path) as first:
        first.cli(
            "server", "add", "time", "--image", PYTHON, "--warm", "0", "--", "mcp-server-time"
        )
        before = json.loads(first.cli("server", "inspect", "time", "--json").stdout)
    with running_daemon(tmp_path) as second:
        after = json.loads(second.cli("server", "inspect", "time", "--json").stdout)
    assert after["image_id"] == before["image_id"]
    assert after["checked"] == before["checked"]


def test_instances_run_the_pinned_image_even_after_the_tag_moves(daemon: Daemon) -> None:
    client = docker.from_env()
    client.images.get(PYTHON).tag("stockade-test/moving", "17")
    daemon.cli(
        "server",
        "add",
        "pinned",
        "--image",
        "stockade-test/moving:17",
        "--warm",
        "0",
        "--",
        "mcp-server-time",
    )
    pinned = json.loads(daemon.cli("server", "inspect", "pinned", "--json").stdout)["image_id"]
    client.images.get("stockade/node:latest").tag("stockade-test/moving", "17")  # moved

    async def session_image() -> str:
        async with HostSession(daemon, "pinned") as host:
            await host.request("initialize", INIT)
            (summary,) = [
                c for c in daemon.containers() if c["Labels"]["io.stockade.server"] == "pinned"
            ]
            return str(summary["ImageID"])

    try:
        assert asyncio.run(session_image()) == pinned
    finally:
        daemon.cli("server", "rm", "pinned")
        client.images.remove("stockade-test/moving:17")


def test_a_failing_shared_server_shows_as_failing(daemon: Daemon) -> None:
    daemon.cli(
        "server",
        "add",
        "sharedbad",
        "--image",
        PYTHON,
        "--shared",
        "--no-check",
        "--",
        "python3",
        "-c",
        "import sys; print('cannot start', file=sys.stderr); sys.exit(2)",
    )
    try:
        wait_until(lambda: daemon.status("sharedbad").get("failures", 0) >= 1, 30, "a failure")
        status = daemon.status("sharedbad")
        assert "exited with code 2; last stderr: cannot start" in status["last_error"]
        assert status["next_retry_at"] > 0
        assert "sharedbad: FAILING" in daemon.cli("server", "status", "sharedbad").stdout
    finally:
        daemon.cli("server", "rm", "sharedbad")
