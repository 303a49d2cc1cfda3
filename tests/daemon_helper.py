"""Run a real `stockaded` for a test, and talk to it as the CLI and as a host would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import grpc

from stockade.cli.channel import credential_args
from stockade.sandbox.spec import LABEL_DAEMON
from stockade.v1 import relay_pb2, relay_pb2_grpc

BIN = Path(sys.executable).parent

# Tests that are not about policy run under this one; policy tests write their own.
ALLOW_ALL_POLICY = """\
version: 1
rules:
  - name: tests-allow-everything
    effect: allow
    identities: ["*"]
    servers: ["*"]
    methods: ["*"]
server_requests:
  everything: ["sampling/createMessage", "elicitation/create", "roots/list"]
"""
SCRATCH_SERVER = (Path(__file__).parent / "scratch_server.py").read_text()

# What every test host sends first: the `initialize` params, and the whole request.
INIT_PARAMS: dict[str, Any] = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "stockade-tests", "version": "1"},
}
INIT_REQUEST: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": INIT_PARAMS,
}


@dataclass
class Daemon:
    root: Path
    process: subprocess.Popen[str] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    policy: str | None = ALLOW_ALL_POLICY
    args: list[str] = field(default_factory=list)  # stockaded's own options
    log_path: Path = field(init=False)
    hosts: dict[str, Path] = field(default_factory=dict)  # host name -> its credentials
    http_base: str = ""  # https://HOST:PORT/servers, when the test starts the HTTP front
    tcp: str = ""  # the TCP listener's address, when the test starts one

    def __post_init__(self) -> None:
        self.log_path = self.root / "stockaded.log"
        if self.policy is not None:
            self.write_policy(self.policy)

    @property
    def policy_dir(self) -> Path:
        return self.root / "policies"

    def write_policy(self, text: str, name: str = "test.yaml") -> Path:
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        path = self.policy_dir / name
        path.write_text(text)
        return path

    @property
    def socket(self) -> Path:
        return self.root / "run" / "stockaded.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        env["STOCKADE_STATE_DIR"] = str(self.state_dir)
        env["STOCKADE_SOCKET_PATH"] = str(self.socket)
        env["STOCKADE_LOG_FORMAT"] = "json"
        env["STOCKADE_STOP_GRACE_SECONDS"] = "1"
        env["STOCKADE_POLICY_DIR"] = str(self.policy_dir)
        env["XDG_CONFIG_HOME"] = str(self.root / "config")  # no credentials from the machine
        env.update(self.extra_env)
        return env

    @property
    def admin_credentials(self) -> Path:
        return self.state_dir / "pki" / "admin"

    @property
    def daemon_id(self) -> str:
        return (self.state_dir / "daemon-id").read_text().strip()

    def start(self) -> None:
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [str(BIN / "stockaded"), *self.args], env=self.env, stdout=log, stderr=log, text=True
        )
        deadline = time.monotonic() + 30
        while not self._accepting():  # a stale socket file from a killed daemon does not count
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"stockaded did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "stockade"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"stockade {' '.join(args)} failed: {result.stderr}")
        return result

    def add_server(self, name: str, image: str, *command: str, warm: int = 1) -> None:
        """Register a server and, with a warm pool, wait until the pool is full."""
        self.cli("server", "add", name, "--image", image, "--warm", str(warm), "--", *command)
        deadline = time.monotonic() + 120
        while warm and self.status(name).get("pooled", 0) < warm:
            if time.monotonic() > deadline:
                raise AssertionError(f"the warm pool of {name} did not fill")
            time.sleep(0.2)

    def issue_host(self, name: str) -> Path:
        """A host certificate, written where `stockade cert issue --out` puts it."""
        folder = self.root / f"creds-{name}"
        self.cli("cert", "issue", "--identity", name, "--out", str(folder))
        self.hosts[name] = folder
        return folder

    def bridge(self, server: str, credentials: Path) -> list[str]:
        """The command line a host's config holds: `stockade connect` with its certificate."""
        return [
            str(BIN / "stockade"),
            "connect",
            server,
            "--socket",
            str(self.socket),
            *credential_args(credentials),
        ]

    def add_scratch_server(self, name: str, *options: str) -> None:
        self.add_script_server(name, SCRATCH_SERVER, *options)

    def add_script_server(self, name: str, script: str, *options: str) -> None:
        """Register `python3 -c SCRIPT` in stockade/python as server `name`."""
        self.cli(
            "server",
            "add",
            name,
            "--image",
            "stockade/python:latest",
            *options,
            "--",
            "python3",
            "-c",
            script,
        )

    def status(self, name: str) -> dict[str, Any]:
        servers = json.loads(self.cli("server", "status", name, "--json").stdout)
        assert len(servers) == 1
        result: dict[str, Any] = servers[0]
        return result

    def containers(self) -> list[dict[str, Any]]:
        """This daemon's containers as the engine sees them (`docker ps -a` by label)."""
        client = docker.from_env()
        found: list[dict[str, Any]] = client.api.containers(
            all=True, filters={"label": f"{LABEL_DAEMON}={self.daemon_id}"}
        )
        return found


def secure_channel(target: str, folder: Path) -> grpc.aio.Channel:
    """An mTLS channel with the client.crt/client.key/ca.crt in `folder`."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(folder / "ca.crt").read_bytes(),
        private_key=(folder / "client.key").read_bytes(),
        certificate_chain=(folder / "client.crt").read_bytes(),
    )
    limit = 16 * 1024 * 1024
    return grpc.aio.secure_channel(
        target,
        credentials,
        options=[
            ("grpc.ssl_target_name_override", "stockaded"),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for a listener the test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_daemon(
    root: Path, policy: str | None = ALLOW_ALL_POLICY, **extra_env: str
) -> Iterator[Daemon]:
    """A started daemon that is always stopped, with nothing of it left in the engine."""
    daemon = Daemon(root, extra_env=dict(extra_env), policy=policy)
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.stop()
        client = docker.from_env()
        for summary in daemon.containers():
            client.api.remove_container(summary["Id"], force=True)


class HostSession:
    """A host's side of Relay.Connect: send JSON-RPC, await answers by id, see `closed`."""

    def __init__(self, daemon: Daemon, server: str, credentials: Path | None = None) -> None:
        self._channel = secure_channel(
            f"unix:{daemon.socket}", credentials or daemon.admin_credentials
        )
        self._outgoing: asyncio.Queue[relay_pb2.ClientFrame | None] = asyncio.Queue()
        self._server = server
        self.opened: relay_pb2.SessionOpened | None = None
        self.closed: relay_pb2.SessionClosed | None = None
        self.messages: list[dict[str, Any]] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._next_id = 0

    async def __aenter__(self) -> HostSession:
        await self._outgoing.put(
            relay_pb2.ClientFrame(open=relay_pb2.OpenSession(server=self._server))
        )
        self._call = relay_pb2_grpc.RelayStub(self._channel).Connect(self._frames())
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(
            lambda: self.opened is not None or self.closed is not None or self.error, 60
        )
        if self.error is not None:
            await self._channel.close()
            raise self.error
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._outgoing.put(None)
        if self._reader:
            try:
                await asyncio.wait_for(self._reader, 30)
            except TimeoutError:
                self._reader.cancel()
        await self._channel.close()

    async def _frames(self) -> Any:
        while (frame := await self._outgoing.get()) is not None:
            yield frame

    async def _read(self) -> None:
        try:
            await self._read_frames()
        except grpc.aio.AioRpcError as exc:
            async with self._arrived:
                self.error = exc
                self._arrived.notify_all()

    async def _read_frames(self) -> None:
        async for frame in self._call:
            kind = frame.WhichOneof("kind")
            async with self._arrived:
                if kind == "opened":
                    self.opened = frame.opened
                elif kind == "closed":
                    self.closed = frame.closed
                else:
                    self.messages.append(json.loads(frame.message))
                self._arrived.notify_all()

    async def wait_for(self, predicate: Any, timeout: float) -> None:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(predicate), timeout)

    async def send_raw(self, raw: bytes) -> None:
        await self._outgoing.put(relay_pb2.ClientFrame(message=raw))

    async def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._next_id += 1
        body = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params or {}}
        await self.send_raw(json.dumps(body).encode())
        return self._next_id

    def answer(self, request_id: Any) -> dict[str, Any] | None:
        for message in self.messages:
            if message.get("id") == request_id and "method" not in message:
                return message
        return None

    async def request(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        request_id = await self.send(method, params)
        await self.wait_for(lambda: self.answer(request_id) is not None, timeout)
        answer = self.answer(request_id)
        assert answer is not None
        return answer
