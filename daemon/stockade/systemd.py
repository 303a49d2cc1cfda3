"""systemd integration, by its documented protocols (no libsystemd needed).

- `notify`: sd_notify(3): one datagram to $NOTIFY_SOCKET (READY=1, STOPPING=1, STATUS=…,
  WATCHDOG=1). Without $NOTIFY_SOCKET it does nothing: the daemon runs the same elsewhere.
- `watchdog_interval`: half of $WATCHDOG_USEC when $WATCHDOG_PID is us (or unset).
- `listen_fds`: sd_listen_fds(3): sockets passed by socket activation start at fd 3, when
  $LISTEN_PID is this process. The variables are removed so children never inherit them.
"""

from __future__ import annotations

import os
import socket

LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send `lines` (KEY=VALUE) to the service manager; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto("\n".join(lines).encode(), address)
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def listen_fds() -> list[socket.socket]:
    """The listening sockets systemd passed us (empty when not socket-activated)."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
