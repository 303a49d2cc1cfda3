"""The systemd units, and the daemon's side of socket activation and sd_notify."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stockade.paths import relay_socket_path
from tests.daemon_helper import Daemon

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is missing (scripts/test.sh installs systemd)"
)


def units_for(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped units, with ExecStart pointing at this checkout's stockaded."""
    service = tmp_path / "stockaded.service"
    service.write_text(
        (ROOT / "systemd" / "stockaded.service")
        .read_text()
        .replace("/usr/local/bin/stockaded", str(BIN / "stockaded"))
    )
    socket_unit = tmp_path / "stockaded.socket"
    shutil.copy(ROOT / "systemd" / "stockaded.socket", socket_unit)
    return service, socket_unit


@needs_systemd
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    service, socket_unit = units_for(tmp_path)
    checked = subprocess.run(
        [str(ANALYZE), "verify", str(socket_unit), str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stderr.strip() == "", checked.stderr


@needs_systemd
def test_service_exposure_score_is_at_most_3(tmp_path: Path) -> None:
    service, _ = units_for(tmp_path)
    analysed = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for stockaded\.service: ([0-9.]+)", analysed.stdout)
    assert found, analysed.stdout + analysed.stderr
    assert float(found[1]) <= 3.0, found[0]


def _datagrams(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Notify messages received until one contains `until`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in seen[-1]:
            return seen
    raise AssertionError(f"no {until!r} from the daemon; got {seen}")


@pytest.mark.docker
def test_socket_activation_and_notify(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.socket.parent.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(daemon.socket))  # what stockaded.socket does
    listener.listen(16)
    relay_path = relay_socket_path(daemon.socket)  # stockaded.socket's second ListenStream
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.bind(str(relay_path))
    relay.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = daemon.env | {
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "1000000",
        "LISTEN_FDS": "2",
    }
    # As systemd does: the sockets are fds 3 and 4, and LISTEN_PID is the daemon's own pid
    # (a Python launcher: sh cannot name the relay socket's fd when it is above 9).
    fd = relay.fileno()
    launcher = (
        f"import os; os.dup2(0, 3); os.dup2({fd}, 4); os.close({fd}); "
        "null = os.open('/dev/null', os.O_RDONLY); os.dup2(null, 0); os.close(null); "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        f"os.execv({str(BIN / 'stockaded')!r}, ['stockaded'])"
    )
    with daemon.log_path.open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", launcher],
            stdin=listener.fileno(),
            stdout=log,
            stderr=log,
            env=env,
            pass_fds=(fd,),
        )
    listener.close()  # only the daemon holds them now
    relay.close()
    try:
        ready = _datagrams(notify, "READY=1", 60)
        assert any("STATUS=serving on unix:" in m for m in ready)
        assert "WATCHDOG=1" in "".join(_datagrams(notify, "WATCHDOG=1", 5))
        status = daemon.cli("status")  # over the activated socket, mTLS end to end
        assert "(socket-activated)" in status.stdout
        assert f"frames+unix:{relay_path} (socket-activated)" in status.stdout
        # The bridge over the activated relay socket: handshake, identity, the opener's answer.
        bridge = subprocess.run(
            daemon.bridge("nosuch", daemon.admin_credentials),
            input=b"",
            capture_output=True,
            timeout=60,
            env=daemon.env,
        )
        assert bridge.returncode == 2
        assert b"no server named 'nosuch'" in bridge.stderr
        process.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in m for m in _datagrams(notify, "STOPPING=1", 30))
        assert process.wait(60) == 0
        assert daemon.socket.exists()  # systemd's sockets are left for systemd to remove
        assert relay_path.exists()
        assert not (daemon.state_dir / "grpc.sock").exists()
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()
        os.environ.pop("NOTIFY_SOCKET", None)
