"""The daemon's own TLS certificate, naming every address it listens on (gRPC and HTTP).

Both listeners (`api/server.py`, `http/front.py`) present the same certificate, so the names
it must carry are worked out in one place from the settings.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from stockade.config import Settings
from stockade.pki.authority import CertificateAuthority


def server_certificate(settings: Settings, authority: CertificateAuthority) -> tuple[Path, Path]:
    """(key, certificate) of the daemon, naming every host it listens on (gRPC and HTTP)."""
    names, ips = list(settings.tls_names), []
    for address in (settings.tcp_address, settings.relay_tcp_address, settings.http_address):
        if address:
            names.append(address.rsplit(":", 1)[0].strip("[]"))
    for name in list(names):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            continue
        names.remove(name)
        ips.append(name)
    return authority.ensure_server_certificate(names, ips)
