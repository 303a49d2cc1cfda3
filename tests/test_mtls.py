"""mTLS on every listener: who is refused, how clearly, and that TLS cannot be turned off."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.pki.authority import CertificateAuthority, write_credentials
from stockade.pki.identity import Identity
from stockade.state_seal import StateSeal
from stockade.v1 import control_pb2, control_pb2_grpc
from tests.daemon_helper import BIN, Daemon, HostSession, running_daemon, secure_channel

pytestmark = pytest.mark.docker

INIT = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
    ).encode()
    + b"\n"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tcp = f"127.0.0.1:{free_port()}"
    with running_daemon(tmp_path_factory.mktemp("mtls"), STOCKADE_TCP_ADDRESS=tcp) as running:
        running.tcp = tcp
        running.add_server("time", "stockade/python:latest", "mcp-server-time", warm=0)
        yield running


def connect(daemon: Daemon, folder: Path, *target: str) -> subprocess.CompletedProcess[str]:
    argv = daemon.bridge("time", folder)
    if target:  # replace the socket with another target
        at = argv.index("--socket")
        argv[at : at + 2] = list(target)
    return subprocess.run(
        argv, input=INIT.decode(), capture_output=True, text=True, timeout=120, env=daemon.env
    )


def issue(daemon: Daemon, name: str, role: str = "host") -> Path:
    folder = daemon.root / f"creds-{name}"
    daemon.cli("cert", "issue", "--identity", name, "--role", role, "--out", str(folder))
    return folder


def test_a_host_certificate_works_over_the_socket_and_over_tcp(daemon: Daemon) -> None:
    folder = issue(daemon, "desktop")
    for target in ([], ["--address", daemon.tcp]):
        result = connect(daemon, folder, *target)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["result"]["serverInfo"]["name"] == "mcp-time"


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
    daemon: Daemon, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(
        tmp_path / "other-ca", StateSeal(Ed25519PrivateKey.generate())
    )
    folder = tmp_path / "impostor"
    write_credentials(folder, other.issue_client(Identity.make("admin", "impostor")))
    (folder / "ca.crt").write_bytes((daemon.state_dir / "pki" / "ca.crt").read_bytes())
    result = connect(daemon, folder)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "refused the TLS handshake" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def status_code_of(make_channel: Callable[[], grpc.aio.Channel]) -> grpc.StatusCode:
    """The status of one GetStatus call on a fresh channel (OK if it went through)."""

    async def call() -> grpc.StatusCode:
        async with make_channel() as channel:
            try:
                await control_pb2_grpc.ControlStub(channel).GetStatus(
                    control_pb2.GetStatusRequest(), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    return asyncio.run(call())


def test_no_client_certificate_is_refused_at_the_handshake(daemon: Daemon) -> None:
    ca = (daemon.state_dir / "pki" / "ca.crt").read_bytes()

    def without_certificate() -> grpc.aio.Channel:  # created inside the call's event loop
        return grpc.aio.secure_channel(
            f"unix:{daemon.socket}",
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[("grpc.ssl_target_name_override", "stockaded")],
        )

    assert status_code_of(without_certificate) is grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_the_tcp_listener_gets_nothing(daemon: Daemon) -> None:
    def plaintext() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(daemon.tcp)

    assert status_code_of(plaintext) is grpc.StatusCode.UNAVAILABLE


def test_a_revoked_certificate_is_refused_from_the_next_call(daemon: Daemon) -> None:
    folder = issue(daemon, "laptop")
    assert connect(daemon, folder).returncode == 0
    revoked = daemon.cli("cert", "revoke", "--identity", "host/laptop")
    assert "spiffe://stockade.local/host/laptop" in revoked.stdout
    result = connect(daemon, folder)
    assert result.returncode == 2
    assert "has been revoked" in result.stderr
    listed = json.loads(daemon.cli("cert", "ls", "--json").stdout)
    laptop = [c for c in listed if c["identity"].endswith("/host/laptop")]
    assert laptop and all(c["revoked"] for c in laptop)
    crl = (daemon.state_dir / "pki" / "crl.pem").read_bytes()
    assert b"BEGIN X509 CRL" in crl


def test_a_host_may_not_use_the_control_api(daemon: Daemon) -> None:
    folder = issue(daemon, "cursor")
    result = daemon.cli(
        "server",
        "ls",
        "--cert",
        str(folder / "client.crt"),
        "--key",
        str(folder / "client.key"),
        "--ca",
        str(folder / "ca.crt"),
        check=False,
    )
    assert result.returncode == 2
    assert "spiffe://stockade.local/host/cursor (role host) may not call" in result.stderr
    records = [
        json.loads(line)
        for path in (daemon.state_dir / "audit").glob("audit-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    refused = [r for r in records if r["type"] == "access" and r["outcome"] == "deny"]
    assert any(  # `audit tail --identity host/cursor` finds its refusals
        r.get("identity") == "spiffe://stockade.local/host/cursor" for r in refused
    ), refused


def test_an_unknown_method_is_refused_even_for_an_admin(daemon: Daemon) -> None:
    async def call() -> tuple[grpc.StatusCode, str]:
        async with secure_channel(f"unix:{daemon.socket}", daemon.admin_credentials) as channel:
            method = channel.unary_unary(
                "/stockade.v1.Control/DropEverything",
                request_serializer=lambda m: b"",
                response_deserializer=lambda b: b,
            )
            try:
                await method(b"", timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    code, details = asyncio.run(call())
    assert code is grpc.StatusCode.UNIMPLEMENTED
    assert "DropEverything" in details


def test_tls_cannot_be_turned_off(tmp_path: Path) -> None:
    config = tmp_path / "stockaded.toml"
    for line in ("tls = false", "insecure = true", "tcp_tls = false"):
        config.write_text(line + "\n")
        result = subprocess.run(
            [str(BIN / "stockaded"), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 78
        assert "unknown setting" in result.stderr


def test_sessions_are_attributed_to_the_callers_certificate(daemon: Daemon) -> None:
    folder = issue(daemon, "attributed")

    async def scenario() -> list[dict[str, str]]:
        async with HostSession(daemon, "time", folder) as host:
            assert host.opened
            return json.loads(daemon.cli("session", "ls", "--json").stdout)

    (session,) = asyncio.run(scenario())
    assert session["identity"] == "spiffe://stockade.local/host/attributed"
    assert session["server"] == "time"
    logged = [
        json.loads(line)
        for line in daemon.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    opened = [r for r in logged if r.get("event") == "session opened"]
    assert opened[-1]["identity"] == "spiffe://stockade.local/host/attributed"
    assert opened[-1]["session"] == session["id"]


def test_a_host_certificate_in_the_config_dir_does_not_shadow_the_admin(daemon: Daemon) -> None:
    """`connect` prefers the user's host certificate; operator commands prefer the admin's."""
    config = Path(daemon.env["XDG_CONFIG_HOME"]) / "stockade"
    daemon.cli("cert", "issue", "--identity", "in-config", "--out", str(config), "--force")
    try:
        assert daemon.cli("server", "ls").returncode == 0  # as the owner's admin
        result = subprocess.run(
            # --drain: wait for the answer even if the pooled server is still starting
            [
                str(BIN / "stockade"),
                "connect",
                "time",
                "--socket",
                str(daemon.socket),
                "--drain",
                "30",
            ],
            input=INIT.decode(),
            capture_output=True,
            text=True,
            timeout=120,
            env=daemon.env,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["result"]["serverInfo"]["name"] == "mcp-time"
        logged = [
            json.loads(line)
            for line in daemon.log_path.read_text().splitlines()
            if line.startswith("{")
        ]
        opened = [r for r in logged if r.get("event") == "session opened"]
        assert opened[-1]["identity"] == "spiffe://stockade.local/host/in-config"
    finally:
        for name in ("client.crt", "client.key", "ca.crt"):
            (config / name).unlink(missing_ok=True)
