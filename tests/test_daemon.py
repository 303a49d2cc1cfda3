"""stockaded as a process: starts, serves status on a root-only socket, stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "stockade"), *args], capture_output=True, text=True, env=env, timeout=30
    )


@pytest.fixture
def daemon_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["STOCKADE_STATE_DIR"] = str(tmp_path / "state")
    env["STOCKADE_SOCKET_PATH"] = str(tmp_path / "run" / "stockaded.sock")
    env["STOCKADE_LOG_FORMAT"] = "json"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # no credentials from the machine
    return env


@pytest.fixture
def daemon(daemon_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [str(BIN / "stockaded")],
        env=daemon_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    socket_path = Path(daemon_env["STOCKADE_SOCKET_PATH"])
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"stockaded did not start: {process.communicate()[1]}")
        time.sleep(0.05)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_status_over_the_socket(daemon: subprocess.Popen[str], daemon_env: dict[str, str]) -> None:
    result = run_cli("status", "--json", env=daemon_env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["version"]
    sock = daemon_env["STOCKADE_SOCKET_PATH"]
    relay = sock.removesuffix(".sock") + "-relay.sock"
    assert status["listeners"] == [f"unix:{sock}", f"frames+unix:{relay}"]
    assert status["uptime_seconds"] >= 0


def test_socket_state_and_keys_have_tight_permissions(
    daemon: subprocess.Popen[str], daemon_env: dict[str, str]
) -> None:
    sock = Path(daemon_env["STOCKADE_SOCKET_PATH"])
    state = Path(daemon_env["STOCKADE_STATE_DIR"])
    relay = sock.with_name(sock.stem + "-relay.sock")  # the framed relay's, as the gRPC one
    for each in (sock, relay):
        assert stat.S_ISSOCK(each.stat().st_mode)
        assert stat.S_IMODE(each.stat().st_mode) == 0o660
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "pki").stat().st_mode) == 0o700
    for key in ("ca.key", "server.key", "admin/client.key"):
        assert stat.S_IMODE((state / "pki" / key).stat().st_mode) == 0o600, key


def test_sigterm_stops_cleanly_and_removes_the_socket(
    daemon: subprocess.Popen[str], daemon_env: dict[str, str]
) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0
    sock = Path(daemon_env["STOCKADE_SOCKET_PATH"])
    assert not sock.exists()
    assert not sock.with_name(sock.stem + "-relay.sock").exists()
    logged = [json.loads(line) for line in daemon.stderr.read().splitlines()]  # type: ignore[union-attr]
    assert [r["event"] for r in logged if r["logger"] == "stockade.daemon"] == [
        "stockaded started",
        "stockaded stopping",
        "stockaded stopped",
    ]


def test_bad_setting_stops_the_daemon_with_one_line(daemon_env: dict[str, str]) -> None:
    daemon_env["STOCKADE_MAX_MESSAGE_BYTES"] = "tiny"
    result = subprocess.run(
        [str(BIN / "stockaded")], env=daemon_env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "max_message_bytes" in lines[0]
    assert "STOCKADE_MAX_MESSAGE_BYTES" in lines[0]


def test_refuses_to_replace_a_file_that_is_not_a_socket(daemon_env: dict[str, str]) -> None:
    sock = Path(daemon_env["STOCKADE_SOCKET_PATH"])
    sock.parent.mkdir(parents=True)
    sock.write_text("precious")
    result = subprocess.run(
        [str(BIN / "stockaded")], env=daemon_env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 4
    assert "is not a socket" in result.stderr
    assert sock.read_text() == "precious"


def test_status_without_a_daemon_says_so(daemon_env: dict[str, str]) -> None:
    result = run_cli("status", env=daemon_env)
    assert result.returncode == 3
    assert "does not answer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
