"""Sandbox policy through the real supervisor and engine: egress, mounts, capabilities, caps.

Egress targets are only containers this module starts on its own network (never outside
addresses): `target.test` (allowed, its address explicitly allowed), and `other.test` (on the
same network, not allowed; and, under a second name, allowed but resolving to a private
address, which the SSRF guard refuses).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import docker
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from docker.models.containers import Container

from stockade.config import MiB, Settings
from stockade.policy.loader import PolicyError, load_policy
from stockade.policy.sandbox import EgressPolicy, MountPolicy, SandboxPolicy
from stockade.registry import Registry, SandboxSettings, ServerDefinition
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.egress import LABEL_GATEWAY_DAEMON
from stockade.sandbox.spec import LABEL_DAEMON
from stockade.state_seal import StateSeal
from stockade.supervisor.spec_rules import SandboxRefused
from stockade.supervisor.supervisor import Supervisor
from tests.daemon_helper import INIT_PARAMS as INIT
from tests.daemon_helper import HostSession, running_daemon

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

PYTHON_IMAGE = "stockade/python:latest"
POLICY_DENIED = -32010
ROOT = Path(__file__).resolve().parent.parent
# A web server on 8080 and a line echo on 9000, answering with the container's own name.
TARGET_SCRIPT = """
import asyncio, os, socket
NAME = socket.gethostname().encode()
async def http(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    body = b"hello from " + NAME
    writer.write(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
    await writer.drain(); writer.close()
async def echo(reader, writer):
    line = await reader.readline()
    writer.write(b"echo " + line); await writer.drain(); writer.close()
async def main():
    a = await asyncio.start_server(http, "0.0.0.0", 8080)
    b = await asyncio.start_server(echo, "0.0.0.0", 9000)
    await asyncio.gather(a.serve_forever(), b.serve_forever())
asyncio.run(main())
"""
# Run inside the sandboxed server: each probe prints one line `name: result`.
PROBE_SCRIPT = """
import socket, sys, urllib.request
def attempt(name, action):
    try:
        print(name + ": " + action())
    except Exception as exc:
        print(name + ": failed " + type(exc).__name__)
def http(url):
    return lambda: urllib.request.urlopen(url, timeout=5).read().decode()
def echo(host, port):
    def run():
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"ping\\n")
            return s.recv(100).decode().strip()
    return run
attempt("http", http("http://target.test:8080/"))
attempt("tcp", echo("target.test", 9000))
attempt("private-name", http("http://private.test:8080/"))
attempt("other-name", lambda: socket.gethostbyname("other.test"))
attempt("other-address", echo(sys.argv[1], 9000))
attempt("outside-name", lambda: socket.gethostbyname("pypi.org"))
"""


@dataclass
class EgressLab:
    name: str
    target_address: str
    other_address: str


@pytest.fixture(scope="module")
def test_network() -> Iterator[EgressLab]:
    client = docker.from_env()
    name = f"stockade-test-{uuid.uuid4().hex[:8]}"
    network = client.networks.create(name, driver="bridge", labels={LABEL_DAEMON: "pytest"})
    started: list[Container] = []
    try:
        aliases = {"target": ["target.test"], "other": ["other.test", "private.test"]}
        for alias, names in aliases.items():
            container = client.containers.run(
                PYTHON_IMAGE,
                ["python3", "-c", TARGET_SCRIPT],
                detach=True,
                hostname=alias,
                labels={LABEL_DAEMON: "pytest"},
                network=name,
            )
            started.append(container)
            network.disconnect(container)
            network.connect(container, aliases=names)
        addresses = []
        for container in started:
            container.reload()
            addresses.append(container.attrs["NetworkSettings"]["Networks"][name]["IPAddress"])
        yield EgressLab(name, *addresses)
    finally:
        for container in started:
            container.remove(force=True)
        network.remove()


def _settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        socket_path=tmp_path / "s.sock",
        policy_dir=tmp_path / "policies",
        **fields,
    )


def _container(supervisor_instance_container: str) -> Container:
    return docker.from_env().containers.get(supervisor_instance_container)


def _exec(container: Container, *command: str) -> str:
    result = container.exec_run(list(command), user="10001:10001")
    return str(result.output.decode())


async def _with_instance(
    tmp_path: Path,
    policy: SandboxPolicy,
    check: Any,
    sandbox: SandboxSettings | None = None,
    **settings: Any,
) -> Any:
    """Start one instance of a do-nothing server under `policy`; run `check(container)`."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    seal = StateSeal(Ed25519PrivateKey.generate())  # in-process: nothing anchored
    registry = Registry(state, seal)
    registry.add(
        ServerDefinition(
            name="probe",
            image=PYTHON_IMAGE,
            command=("python3", "-c", "import sys; sys.stdin.read()"),
            warm_pool=0,
            sandbox=sandbox or SandboxSettings(),
        )
    )
    backend = await asyncio.to_thread(DockerBackend)
    daemon_id = uuid.uuid4().hex[:16]
    supervisor = Supervisor(
        _settings(tmp_path, **settings),
        backend,
        registry,
        daemon_id,
        seal=seal,
        sandbox_policy=lambda _name: policy,
    )
    await supervisor.start()
    try:
        instance = await supervisor.acquire("probe", "session-1")
        return await asyncio.to_thread(check, _container(instance.container_id))
    finally:
        await supervisor.shutdown()
        left = backend.networks_by_label({LABEL_GATEWAY_DAEMON: daemon_id})
        assert left == [], "shutdown leaves no egress network behind"


def _probe_results(container: Container, other_address: str) -> dict[str, str]:
    output = _exec(container, "python3", "-c", PROBE_SCRIPT, other_address)
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def test_egress_allowlist_is_enforced(tmp_path: Path, test_network: EgressLab) -> None:
    policy = SandboxPolicy(
        network=EgressPolicy(
            egress=("target.test:8080", "target.test:9000", "private.test:8080"),
            allow_addresses=(f"{test_network.target_address}/32",),
        )
    )
    # private.test is other.test under a second name: allowed by name, private by address.
    client = docker.from_env()

    def check(container: Container) -> tuple[dict[str, str], dict[str, bool]]:
        container.reload()
        internal = {
            name: bool(client.networks.get(name).attrs["Internal"])
            for name in container.attrs["NetworkSettings"]["Networks"]
        }
        return _probe_results(container, test_network.other_address), internal

    results, networks = asyncio.run(
        _with_instance(tmp_path, policy, check, egress_network=test_network.name)
    )
    assert results["http"] == "hello from target"  # HTTP through the gateway
    assert results["tcp"] == "echo ping"  # and plain TCP on another port
    assert results["private-name"].startswith("failed")  # SSRF guard: private address
    assert results["other-name"].startswith("failed")  # not allowed: does not even resolve
    assert results["other-address"].startswith("failed")  # and has no route by address
    assert results["outside-name"].startswith("failed")  # no DNS for anything else
    assert len(networks) == 1
    assert all(networks.values()), "the server sits on an internal network only"


def test_forwarder_logs_the_ssrf_refusal(tmp_path: Path, test_network: EgressLab) -> None:
    policy = SandboxPolicy(network=EgressPolicy(egress=("other.test:8080",)))
    client = docker.from_env()

    def check(container: Container) -> str:
        _exec(container, "python3", "-c", PROBE_SCRIPT.replace("private.test", "other.test"), "")
        name = next(iter(container.attrs["NetworkSettings"]["Networks"]))
        network = client.networks.get(name)
        forwarder_ids = [c for c in network.attrs["Containers"] if c != container.id]
        return "".join(
            client.containers.get(f).logs(stdout=False, stderr=True).decode() for f in forwarder_ids
        )

    logs = asyncio.run(_with_instance(tmp_path, policy, check, egress_network=test_network.name))
    assert f"{test_network.other_address}: private address" in logs
    assert '"event": "refused"' in logs


def test_a_server_without_network_has_none(tmp_path: Path) -> None:
    def check(container: Container) -> tuple[str, str]:
        container.reload()
        interfaces = _exec(
            container, "python3", "-c", "import socket; print(socket.if_nameindex())"
        )
        return container.attrs["HostConfig"]["NetworkMode"], interfaces

    mode, interfaces = asyncio.run(_with_instance(tmp_path, SandboxPolicy(), check))
    assert mode == "none"
    assert interfaces.strip() == "[(1, 'lo')]"


def test_mounts_are_read_only_unless_rw(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("from the host")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chown(scratch, 10001, 10001)  # the container user may write here
    policy = SandboxPolicy(
        mounts=(
            MountPolicy(source=str(data), target="/data"),
            MountPolicy(source=str(scratch), target="/scratch", rw=True),
        )
    )

    def check(container: Container) -> tuple[str, str, str]:
        read = _exec(container, "cat", "/data/hello.txt")
        refused = _exec(container, "touch", "/data/new")
        written = _exec(container, "touch", "/scratch/new")
        return read, refused, written

    read, refused, written = asyncio.run(_with_instance(tmp_path, policy, check))
    assert read == "from the host"
    assert "Read-only file system" in refused
    assert written == ""
    assert (scratch / "new").exists()
    assert not (data / "new").exists()


def test_a_link_to_the_docker_socket_is_refused_at_start(tmp_path: Path) -> None:
    link = tmp_path / "innocent"
    link.symlink_to("/var/run")
    policy = SandboxPolicy(mounts=(MountPolicy(source=str(link), target="/data"),))
    with pytest.raises(SandboxRefused, match="exposes the host"):
        asyncio.run(_with_instance(tmp_path, policy, lambda c: None))


def test_policy_caps_the_registry_and_grants_only_listed_capabilities(tmp_path: Path) -> None:
    policy = SandboxPolicy(memory_mb=128, pids=32, capabilities=("NET_BIND_SERVICE",))
    asked = SandboxSettings(memory_bytes=512 * MiB, pids_limit=256, cpus=0.5)

    def check(container: Container) -> dict[str, Any]:
        container.reload()
        return dict(container.attrs["HostConfig"])

    host_config = asyncio.run(_with_instance(tmp_path, policy, check, sandbox=asked))
    assert host_config["Memory"] == 128 * MiB  # the policy's cap, not the registry's ask
    assert host_config["PidsLimit"] == 32
    assert host_config["NanoCpus"] == 500_000_000  # the registry asked for less: kept
    assert host_config["CapAdd"] == ["NET_BIND_SERVICE"]
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["ReadonlyRootfs"] is True


def test_an_image_the_policy_does_not_pin_is_refused(tmp_path: Path) -> None:
    policy = SandboxPolicy(image="stockade/node:latest")
    with pytest.raises(SandboxRefused, match="allows only 'stockade/node:latest'"):
        asyncio.run(_with_instance(tmp_path, policy, lambda c: None))


@pytest.mark.parametrize(
    ("sandbox", "message"),
    [
        ("{mounts: [{source: /var/run, target: /x}]}", "exposes the Docker socket"),
        ("{mounts: [{source: /, target: /x}]}", "root directory is never mounted"),
        ("{mounts: [{source: /srv, target: /proc/x}]}", "is reserved (/proc)"),
        ("{mounts: [{source: srv, target: /x}]}", "must be an absolute path"),
        ("{capabilities: [SYS_ADMIN]}", "SYS_ADMIN breaks the sandbox"),
        ("{capabilities: [FLY]}", "'FLY' is not a Linux capability"),
        ("{user: '0:0'}", "non-root uid"),
        ("{network: {egress: ['10.0.0.1:80']}}", "give a name, not an address"),
        ("{network: {egress: ['api.github.com']}}", "is not host:port"),
        ("{network: {egress: ['a.test:1'], allow_addresses: [nope]}}", "not an address"),
        ("{network: everything}", "write `none`, or an allowlist"),
        ("{network: none}", None),
    ],
)
def test_sandbox_policies_are_checked_at_load(
    tmp_path: Path, sandbox: str, message: str | None
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nsandboxes:\n  probe: {sandbox}\n")
    if message is None:  # the control: a safe line loads
        assert load_policy([path]).sandbox("probe").egress is None
        return
    with pytest.raises(PolicyError, match=r"p\.yaml:3: sandboxes\.probe") as raised:
        load_policy([path])
    assert message in str(raised.value)


def test_two_files_may_not_both_define_a_sandbox(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\nsandboxes:\n  probe: {memory_mb: 64}\n")
    (tmp_path / "b.yaml").write_text("version: 1\nsandboxes:\n  probe: {memory_mb: 32}\n")
    with pytest.raises(PolicyError, match=r"b\.yaml:3: sandboxes\.probe: already defined at .*a"):
        load_policy([tmp_path])


def _forwarder_module() -> ModuleType:
    path = ROOT / "sandbox-images" / "egress" / "forwarder.py"
    spec = importlib.util.spec_from_file_location("forwarder", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("address", "allowed", "refused"),
    [
        ("169.254.169.254", (), "cloud metadata address"),
        ("fd00:ec2::254", (), "cloud metadata address"),
        ("127.0.0.1", (), "loopback address"),
        ("::1", (), "loopback address"),
        ("169.254.1.1", (), "link-local address"),
        ("10.1.2.3", (), "private address"),
        ("192.168.0.10", (), "private address"),
        ("::ffff:10.0.0.1", (), "private address in IPv4-mapped form (10.0.0.1)"),
        ("::ffff:10.0.0.1", ("10.0.0.0/24",), None),
        ("::ffff:0:a00:5", (), "private address in IPv4-translated form (10.0.0.5)"),
        ("::a00:5", (), "private address in IPv4-compatible form (10.0.0.5)"),
        ("::7f00:1", (), "loopback address in IPv4-compatible form (127.0.0.1)"),
        ("64:ff9b::a00:5", (), "private address in NAT64 form (10.0.0.5)"),
        ("64:ff9b::a9fe:a9fe", (), "cloud metadata address in NAT64 form (169.254.169.254)"),
        ("64:ff9b::a00:5", ("10.0.0.5/32",), None),
        ("64:ff9b::808:808", (), None),
        (
            "64:ff9b:1::a00:5",
            (),
            "local-use NAT64 address (the IPv4 address it carries is not known)",
        ),
        ("2002:a9fe:a9fe::1", (), "cloud metadata address in 6to4 form (169.254.169.254)"),
        ("2002:7f00:1::1", (), "loopback address in 6to4 form (127.0.0.1)"),
        ("2002:808:808::1", (), None),
        # Teredo: server 65.54.227.120; the client is the inverted last 32 bits.
        (
            "2001:0:4136:e378:8000:63bf:f5ff:fffa",
            (),
            "private address in Teredo client form (10.0.0.5)",
        ),
        (
            "2001:0:a00:5:8000:63bf:f7f7:f7f7",
            (),
            "private address in Teredo server form (10.0.0.5)",
        ),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", (), None),
        ("2600::5efe:a00:5", (), "private address in ISATAP form (10.0.0.5)"),
        ("2600::200:5efe:808:808", (), None),
        ("fe80::5efe:808:808", (), "link-local address"),
        ("100.64.0.1", (), "non-global address"),
        ("10.1.2.3", ("10.1.2.0/24",), None),
        ("140.82.112.5", (), None),
    ],
)
def test_ssrf_guard_classifies_addresses(
    address: str, allowed: tuple[str, ...], refused: str | None
) -> None:
    forwarder = _forwarder_module()
    networks = tuple(ipaddress.ip_network(a) for a in allowed)
    assert forwarder.refusal(ipaddress.ip_address(address), networks) == refused


def test_the_filesystem_example_policy_end_to_end(tmp_path: Path) -> None:
    """policies/filesystem.yaml, with its mount pointed at a test folder: reads under
    /data are allowed, writes are denied by rule, and the mount is read-only anyway."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("hello from the host")
    policy = (ROOT / "policies" / "filesystem.yaml").read_text()
    policy = policy.replace("/srv/stockade/data", str(data))
    with running_daemon(tmp_path / "daemon", policy=policy) as daemon:
        daemon.add_server(
            "filesystem", "stockade/node:latest", "mcp-server-filesystem", "/data", warm=0
        )
        laptop = daemon.issue_host("laptop")

        async def scenario() -> tuple[dict[str, Any], ...]:
            async with HostSession(daemon, "filesystem", laptop) as host:
                await host.request("initialize", INIT)
                read = await host.request(
                    "tools/call",
                    {"name": "read_text_file", "arguments": {"path": "/data/hello.txt"}},
                )
                outside = await host.request(
                    "tools/call", {"name": "read_text_file", "arguments": {"path": "/etc/passwd"}}
                )
                write = await host.request(
                    "tools/call",
                    {"name": "write_file", "arguments": {"path": "/data/x", "content": "no"}},
                )
                return read, outside, write

        read, outside, write = asyncio.run(scenario())
    assert read["result"]["content"][0]["text"] == "hello from the host"
    assert outside["error"]["code"] == POLICY_DENIED
    assert write["error"]["code"] == POLICY_DENIED
    assert write["error"]["data"]["rule"] == "filesystem-never-write"
    assert not (data / "x").exists()
