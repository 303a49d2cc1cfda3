"""The framed relay (api/frames.py) and the light bridge: refusals audited, frames bounded,
revocation ends streams, and `stockade connect` loads no heavy module.

A real daemon, real containers, and a raw TLS client that speaks the frames itself, so that
each test can send what the bridge never would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.paths import relay_socket_path
from stockade.pki.authority import CertificateAuthority, write_credentials
from stockade.pki.identity import Identity
from stockade.state_seal import StateSeal
from stockade.wire import frames
from tests.daemon_helper import BIN, Daemon, free_port, running_daemon, wait_until
from tests.daemon_helper import INIT_REQUEST as INIT

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

MAX_MESSAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("frames")
    with running_daemon(root, STOCKADE_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES)) as running:
        running.add_scratch_server("scratch", "--warm", "0")
        for name in ("framed", "doomed", "early-revoked", "refused"):
            running.issue_host(name)
        yield running


def audit(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted((daemon.state_dir / "audit").glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def refusals(daemon: Daemon, reason_part: str) -> list[dict[str, Any]]:
    return [
        r
        for r in audit(daemon)
        if r["type"] == "access"
        and r.get("transport") == "frames"
        and r["outcome"] == "deny"
        and reason_part in r["reason"]
    ]


def context(daemon: Daemon, credentials: Path | None) -> ssl.SSLContext:
    """A client context trusting the daemon's CA, with `credentials`' certificate if given."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.load_verify_locations(cafile=daemon.admin_credentials / "ca.crt")
    if credentials is not None:
        tls.load_cert_chain(credentials / "client.crt", credentials / "client.key")
    return tls


class Raw:
    """A framed relay connection driven by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, daemon: Daemon, credentials: Path | None) -> Raw:
        reader, writer = await asyncio.open_unix_connection(
            str(relay_socket_path(daemon.socket)),
            ssl=context(daemon, credentials),
            server_hostname="stockaded",
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> frames.Frame | None:
        return await asyncio.wait_for(frames.read_frame(self.reader, 1 << 24), 30)

    async def open(self, server: str = "scratch") -> dict[str, Any]:
        await self.send(frames.control(frames.OPEN, server=server, options={}))
        opened = await self.frame()
        assert opened is not None and opened.kind == frames.OPENED, opened
        return opened.fields()

    async def request(self, request_id: int, method: str, params: dict[str, Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        await self.send(frames.encode(frames.MESSAGE, json.dumps(body).encode()))
        while (frame := await self.frame()) is not None:
            if frame.kind != frames.MESSAGE:
                return frame
            answer = json.loads(frame.payload)
            if answer.get("id") == request_id and "method" not in answer:
                return answer
        return None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def refused_handshake(daemon: Daemon, credentials: Path | None) -> None:
    """Connect and read: the daemon ends the connection without a frame (asyncio drops the
    TLS alert OpenSSL wrote; the client sees the end of the stream or an error)."""
    try:
        raw = await Raw.connect(daemon, credentials)
        raw.writer.write(frames.control(frames.OPEN, server="scratch", options={}))
        frame = await raw.frame()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return
    assert frame is None, f"the handshake was accepted: {frame}"


def test_a_handshake_without_a_certificate_is_refused_and_audited(daemon: Daemon) -> None:
    before = len(refusals(daemon, "did not return a certificate"))
    asyncio.run(refused_handshake(daemon, None))
    wait_until(
        lambda: len(refusals(daemon, "did not return a certificate")) > before, 10, "a record"
    )
    record = refusals(daemon, "did not return a certificate")[-1]
    assert record["identity"] == ""  # no certificate: no identity
    assert record["action"] == "/stockade.v1.Relay/Connect"


def test_a_certificate_from_another_ca_is_refused_and_audited(
    daemon: Daemon, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(
        tmp_path / "other-ca", StateSeal(Ed25519PrivateKey.generate())
    )
    folder = tmp_path / "stranger"
    write_credentials(folder, other.issue_client(Identity.make("host", "stranger")))
    before = len(refusals(daemon, "unable to get local issuer certificate"))
    asyncio.run(refused_handshake(daemon, folder))
    wait_until(
        lambda: len(refusals(daemon, "unable to get local issuer certificate")) > before,
        10,
        "a record",
    )


def test_a_revoked_certificate_is_refused_with_its_reason_and_audited(daemon: Daemon) -> None:
    daemon.cli("cert", "revoke", "--identity", "host/early-revoked")
    result = subprocess.run(
        daemon.bridge("scratch", daemon.hosts["early-revoked"]),
        input=json.dumps(INIT).encode() + b"\n",
        capture_output=True,
        timeout=60,
        env=daemon.env,
    )
    assert result.returncode == 2, result.stderr
    assert b"has been revoked" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (record,) = refusals(daemon, "has been revoked")
    assert record["identity"] == "spiffe://stockade.local/host/early-revoked"
    assert "CN=early-revoked" in record["detail"]["subject"]


def test_a_flood_of_bad_handshakes_is_one_record_with_a_count(daemon: Daemon) -> None:
    async def flood() -> None:
        for _ in range(40):
            await refused_handshake(daemon, None)

    asyncio.run(flood())
    time.sleep(0.5)
    # One record per minute per reason: the earlier test's, or one from this flood.
    assert len(refusals(daemon, "did not return a certificate")) <= 2


def test_an_oversized_frame_ends_that_stream_only(daemon: Daemon) -> None:
    async def scenario() -> tuple[frames.Frame | None, frames.Frame | None, Any]:
        big, small = (
            await Raw.connect(daemon, daemon.hosts["framed"]),
            await Raw.connect(daemon, daemon.hosts["framed"]),
        )
        try:
            await big.open()
            await small.open()
            # A header announcing more than the limit: refused before any payload is read.
            await big.send(frames.HEADER.pack(MAX_MESSAGE_BYTES + 1, frames.MESSAGE))
            error, after = await big.frame(), await big.frame()
            answer = await small.request(7, "scratch/echo", {"still": "here"})
            return error, after, answer
        finally:
            await big.close()
            await small.close()

    error, after, answer = asyncio.run(scenario())
    assert error is not None and error.kind == frames.ERROR
    assert error.fields()["code"] == frames.TOO_LARGE
    assert str(MAX_MESSAGE_BYTES) in error.fields()["reason"]
    assert after is None  # the stream ended
    assert answer["result"]["echo"] == {"still": "here"}


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (
            frames.encode(frames.MESSAGE, b'{"jsonrpc":"2.0","id":1,"method":"ping"}'),
            "the first frame must be `open`",
        ),
        (frames.encode(0x7F, b"x"), "unknown frame type"),
        (frames.encode(frames.OPEN, b"not json"), "JSON object"),
        (frames.control(frames.OPEN, server="scratch", options={"x": 1}), "unknown session"),
    ],
)
def test_a_bad_first_frame_gets_an_error_and_the_stream_ends(
    daemon: Daemon, first: bytes, says: str
) -> None:
    async def scenario() -> tuple[frames.Frame | None, frames.Frame | None]:
        raw = await Raw.connect(daemon, daemon.hosts["framed"])
        try:
            await raw.send(first)
            return await raw.frame(), await raw.frame()
        finally:
            await raw.close()

    error, after = asyncio.run(scenario())
    assert error is not None and error.kind == frames.ERROR
    assert error.fields()["code"] == frames.BAD_FRAME
    assert says in error.fields()["reason"]
    assert after is None


def test_revoking_a_certificate_ends_its_open_framed_stream(daemon: Daemon) -> None:
    async def scenario() -> tuple[Any, frames.Frame | None, float]:
        raw = await Raw.connect(daemon, daemon.hosts["doomed"])
        try:
            await raw.open()
            first = await raw.request(1, "scratch/echo", {"n": 1})
            began = time.monotonic()
            await asyncio.to_thread(daemon.cli, "cert", "revoke", "--identity", "host/doomed")
            ended = await raw.frame()
            return first, ended, time.monotonic() - began
        finally:
            await raw.close()

    first, ended, took = asyncio.run(scenario())
    assert first["result"]["echo"] == {"n": 1}
    assert ended is not None and ended.kind == frames.ERROR
    assert ended.fields()["code"] == frames.REVOKED
    assert took < 10
    revoked = [r for r in audit(daemon) if r["type"] == "session.revoked"]
    assert revoked and len(revoked[-1]["detail"]["sessions"]) == 1


def test_the_bridge_imports_no_heavy_module(daemon: Daemon) -> None:
    """A real session through `stockade connect`, with every import it made listed."""
    argv = daemon.bridge("scratch", daemon.hosts["framed"])
    result = subprocess.run(
        [str(BIN / "python"), "-X", "importtime", *argv],
        input=json.dumps(INIT).encode() + b"\n",
        capture_output=True,
        timeout=60,
        env=daemon.env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == 1
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "stockade" in imported and "ssl" in imported  # the list is real
    heavy = {"grpc", "google", "pydantic", "pydantic_settings", "structlog", "cryptography"}
    assert imported & (heavy | {"docker"}) == set()
    # Nor what made it slow to start after those: it runs on selectors.
    assert imported & {"asyncio", "dataclasses"} == set()


def test_the_bridge_reaches_the_framed_relay_over_tcp(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    with running_daemon(tmp_path, STOCKADE_RELAY_TCP_ADDRESS=address) as tcp_daemon:
        tcp_daemon.add_scratch_server("scratch", "--warm", "0")
        argv = tcp_daemon.bridge("scratch", tcp_daemon.issue_host("tcp-host"))
        at = argv.index("--socket")
        argv[at : at + 2] = ["--relay-address", address, "--drain", "30"]
        tcp_daemon.extra_env["STOCKADE_SOCKET_PATH"] = str(tmp_path / "no-such.sock")
        result = subprocess.run(
            argv,
            input=json.dumps(INIT).encode() + b"\n",
            capture_output=True,
            timeout=60,
            env=tcp_daemon.env,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["id"] == 1
        opened = [r for r in audit(tcp_daemon) if r["type"] == "session.open"]
        assert opened[-1]["peer"].startswith("ipv4:127.0.0.1:")


def test_a_slow_handshake_and_a_missing_open_are_cut_off(daemon: Daemon) -> None:
    """Neither a caller that never finishes its handshake nor one that never opens a session
    holds a connection past the deadlines (10 s each)."""

    async def silent() -> float:
        began = time.monotonic()
        reader, writer = await asyncio.open_unix_connection(str(relay_socket_path(daemon.socket)))
        try:
            await asyncio.wait_for(reader.read(), 30)  # nothing sent, not even a ClientHello
        finally:
            writer.close()
        return time.monotonic() - began

    async def idle() -> tuple[frames.Frame | None, float]:
        raw = await Raw.connect(daemon, daemon.hosts["framed"])
        began = time.monotonic()
        try:
            return await raw.frame(), time.monotonic() - began
        finally:
            await raw.close()

    async def both() -> tuple[float, tuple[frames.Frame | None, float]]:
        return await asyncio.gather(silent(), idle())

    silent_for, (error, idle_for) = asyncio.run(both())
    assert 9 < silent_for < 20
    assert error is not None and error.fields()["code"] == frames.TIMEOUT
    assert 9 < idle_for < 20
    wait_until(lambda: refusals(daemon, "TLS handshake not done within 10 s"), 10, "a record")
