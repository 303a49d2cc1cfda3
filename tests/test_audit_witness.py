"""Issue 15: signed checkpoints leave the host, and a real rsyslog collector receives them.

The collector is Debian's rsyslogd (imtcp over TLS with the gtls driver, RFC 5425
octet-counted framing), started by the test on a loopback port with certificates the test
makes. The daemon is the real `stockaded`; the verifier is the real `stockade audit verify`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stockade.audit.chain import load_public_key
from stockade.audit.verify import audit_files, valid_signature
from tests.daemon_helper import Daemon, free_port
from tests.test_audit_rollback import stockade

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificates(folder: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1; returns the CA file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test collector CA"))
        .issuer_name(_name("test collector CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("collector"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return folder / "ca.pem"


class Collector:
    """rsyslogd receiving RFC 5425 syslog over TLS on a loopback port, into one file."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.received = folder / "received.log"
        self.ca = _certificates(folder)
        (folder / "work").mkdir(exist_ok=True)
        self.config = folder / "rsyslog.conf"
        self.config.write_text(
            f'global(workDirectory="{folder}/work"\n'
            '       defaultNetstreamDriver="gtls"\n'
            f'       defaultNetstreamDriverCAFile="{folder}/ca.pem"\n'
            f'       defaultNetstreamDriverCertFile="{folder}/server.pem"\n'
            f'       defaultNetstreamDriverKeyFile="{folder}/server.key")\n'
            'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"\n'
            '       streamDriver.authMode="anon")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{port}")\n'
            f'action(type="omfile" file="{self.received}")\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.config), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=(self.folder / "rsyslogd.out").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "rsyslogd did not start: " + (self.folder / "rsyslogd.out").read_text()
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def checkpoints(self) -> list[dict[str, object]]:
        if not self.received.exists():
            return []
        found = []
        for line in self.received.read_text().splitlines():
            if '"audit.checkpoint"' in line:
                found.append(json.loads(line[line.index("{") :]))
        return found


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    if not Path(RSYSLOGD).exists():
        pytest.fail("rsyslogd is missing: scripts/test.sh installs rsyslog and rsyslog-gnutls")
    folder = tmp_path / "collector"
    folder.mkdir()
    running = Collector(folder, free_port())
    try:
        yield running
    finally:
        running.stop()


def _wait(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _witness_status(daemon: Daemon) -> dict[str, dict[str, object]]:
    status = json.loads(daemon.cli("status", "--json").stdout)
    return {w["name"]: w for w in status.get("audit_witnesses", [])}


def test_rsyslog_receives_signed_checkpoints_and_verify_uses_them(
    tmp_path: Path, collector: Collector
) -> None:
    collector.start()
    witness_file = tmp_path / "elsewhere" / "heads.jsonl"
    witness_file.parent.mkdir()
    daemon = Daemon(
        tmp_path / "daemon",
        extra_env={
            "STOCKADE_AUDIT_WITNESS_SYSLOG": f"127.0.0.1:{collector.port}",
            "STOCKADE_AUDIT_WITNESS_SYSLOG_CA": str(collector.ca),
            "STOCKADE_AUDIT_WITNESS_FILE": str(witness_file),
            "STOCKADE_AUDIT_CHECKPOINT_SECONDS": "0.5",
        },
    )
    daemon.start()
    try:
        daemon.cli("cert", "ls")
        _wait(collector.checkpoints, "a checkpoint at rsyslog")
        key = load_public_key(daemon.state_dir / "pki" / "audit-key.pub")
        assert all(valid_signature(key, c) for c in collector.checkpoints())
        _wait(
            lambda: all(
                int(str(w.get("acknowledged_seq", 0))) > 0 for w in _witness_status(daemon).values()
            ),
            "both witnesses to acknowledge",
        )
        states = _witness_status(daemon)
        assert set(states) == {"file", "syslog"}
        assert all(w["state"] == "ok" for w in states.values()), states
        acks = {p.name for p in (daemon.state_dir / "audit-anchor").glob("witness-*.json")}
        assert acks == {"witness-file.json", "witness-syslog.json"}
    finally:
        assert daemon.stop() == 0
    _wait(
        lambda: len(collector.checkpoints()) == len(witness_file.read_text().splitlines()),
        "the final checkpoint at rsyslog",
    )
    pub = str(daemon.state_dir / "pki" / "audit-key.pub")
    audit = str(daemon.state_dir / "audit")
    witnessed = ["--witness", str(collector.received), "--witness", str(witness_file)]
    ok = stockade("audit", "verify", "--dir", audit, "--key", pub, *witnessed)
    assert ok.returncode == 0, ok.stdout
    # The whole audit folder rolled back to the first checkpoint: only the witnesses know.
    path = audit_files([Path(audit)])[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    first = next(n for n, line in enumerate(lines) if b'"audit.checkpoint"' in line)
    path.write_bytes(b"".join(lines[: first + 1]))
    (Path(audit) / "head.json").write_bytes(lines[first].rstrip(b"\n"))
    newest = [collector.checkpoints()[-1], json.loads(witness_file.read_text().splitlines()[-1])]
    caught = stockade("audit", "verify", "--dir", audit, "--key", pub, *witnessed)
    assert caught.returncode == 2, caught.stdout
    assert any(  # the first witness it reads says so
        f"behind the witnessed head at seq {head['seq']} ({head['ts']})" in caught.stdout
        for head in newest
    ), caught.stdout


def test_an_unreachable_witness_is_retried_and_traffic_goes_on(
    tmp_path: Path, collector: Collector
) -> None:
    daemon = Daemon(
        tmp_path / "daemon",
        extra_env={
            "STOCKADE_AUDIT_WITNESS_SYSLOG": f"127.0.0.1:{collector.port}",
            "STOCKADE_AUDIT_WITNESS_SYSLOG_CA": str(collector.ca),
            "STOCKADE_AUDIT_CHECKPOINT_SECONDS": "0.5",
        },
    )
    daemon.start()
    try:
        daemon.cli("cert", "ls")  # the collector is down: admin calls still work
        _wait(
            lambda: str(_witness_status(daemon)["syslog"]["state"]).startswith("unreachable"),
            "the witness to be reported unreachable",
        )
        assert "retrying in" in str(_witness_status(daemon)["syslog"]["state"])
        assert "audit witness syslog: unreachable" in daemon.cli("status").stdout
        collector.start()
        _wait(collector.checkpoints, "the retried checkpoint at rsyslog")
        _wait(lambda: _witness_status(daemon)["syslog"]["state"] == "ok", "the witness ok")
    finally:
        assert daemon.stop() == 0


class HttpsReceiver:
    """A real HTTPS endpoint (aiohttp, TLS) that refuses its first checkpoint with a 503."""

    def __init__(self, folder: Path) -> None:
        self.ca = _certificates(folder)
        self.folder = folder
        self.port = free_port()
        self.bodies: list[bytes] = []
        self.statuses: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _receive(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        status = 503 if len(self.bodies) == 1 else 200
        self.statuses.append(status)
        return web.Response(status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/checkpoints", self._receive)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.folder / "server.pem", self.folder / "server.key")
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context).start()

    def __enter__(self) -> HttpsReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def test_an_https_witness_is_retried_until_it_acknowledges(tmp_path: Path) -> None:
    folder = tmp_path / "receiver"
    folder.mkdir()
    with HttpsReceiver(folder) as receiver:
        daemon = Daemon(
            tmp_path / "daemon",
            extra_env={
                "STOCKADE_AUDIT_WITNESS_HTTPS": f"https://127.0.0.1:{receiver.port}/checkpoints",
                "STOCKADE_AUDIT_WITNESS_HTTPS_CA": str(receiver.ca),
                "STOCKADE_AUDIT_CHECKPOINT_SECONDS": "0.5",
            },
        )
        daemon.start()
        try:
            daemon.cli("cert", "ls")
            _wait(
                lambda: int(str(_witness_status(daemon)["https"].get("acknowledged_seq", 0))) > 0,
                "the HTTPS witness to acknowledge",
            )
        finally:
            assert daemon.stop() == 0
    assert receiver.statuses[:2] == [503, 200]
    assert receiver.bodies[0] == receiver.bodies[1]  # the refused checkpoint, sent again
    key = load_public_key(daemon.state_dir / "pki" / "audit-key.pub")
    assert all(valid_signature(key, json.loads(body)) for body in receiver.bodies)
