"""A sandbox on an egress network reaches its forwarders and nothing else: not the host, not
another instance. Real engine, real iptables; the tests start their own listeners.

Each "unreachable" is paired with a control that proves the same probe sees a reachable
listener, so a broken probe cannot pass for isolation.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from docker.models.containers import Container

from stockade.policy.sandbox import EgressPolicy, SandboxPolicy
from stockade.registry import Registry, ServerDefinition
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.egress import EgressError, EgressGateways
from stockade.sandbox.firewall import EgressFirewall
from stockade.state_seal import StateSeal
from stockade.supervisor.supervisor import Supervisor
from tests.test_sandbox_policy import (
    PYTHON_IMAGE,
    EgressLab,
    _exec,
    _settings,
    _with_instance,
    test_network,  # noqa: F401 - the module's fixture, shared
)

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]

TOKEN = "stockade-host-listener"
# Connects to each address given as host:port (in parallel) and prints `address: result`.
CONNECT_SCRIPT = """
import socket, sys, threading
def attempt(target):
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=4) as s:
            s.sendall(b"ping\\n")
            result = s.recv(100).decode().strip()
    except Exception as exc:
        result = "failed " + type(exc).__name__
    results[target] = result
results = {}
threads = [threading.Thread(target=attempt, args=(t,)) for t in sys.argv[1:]]
for t in threads: t.start()
for t in threads: t.join()
print("\\n".join(t + ": " + r for t, r in results.items()))
"""


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP listener on the host on 0.0.0.0 (all addresses), answering a token; its port."""
    server = socket.create_server(("0.0.0.0", 0), backlog=64)  # noqa: S104 - the point
    port = int(server.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(TOKEN.encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join()
        server.close()


def host_addresses() -> list[str]:
    """Every IPv4 and global IPv6 address of this host (but loopback), from `ip -j addr`."""
    listing = json.loads(
        subprocess.run(["ip", "-j", "addr"], check=True, capture_output=True).stdout
    )
    addresses = []
    for interface in listing:
        for info in interface.get("addr_info", []):
            if info.get("scope") == "host" or info.get("tentative"):
                continue
            if info["family"] == "inet" or info.get("scope") == "global":
                addresses.append(info["local"])
    return addresses


def _target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _connect_from(container: Container, targets: list[str]) -> dict[str, str]:
    output = _exec(container, "python3", "-c", CONNECT_SCRIPT, *targets)
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def _gateway(client: docker.DockerClient, network: str) -> str:
    config = client.networks.get(network).attrs["IPAM"]["Config"]
    return str(next(c["Gateway"] for c in config if "." in c.get("Subnet", "")))


def test_a_sandbox_on_an_egress_network_cannot_reach_the_host(
    tmp_path: Path,
    test_network: EgressLab,  # noqa: F811
    host_listener: int,
) -> None:
    client = docker.from_env()
    policy = SandboxPolicy(
        network=EgressPolicy(
            egress=("target.test:9000",), allow_addresses=(f"{test_network.target_address}/32",)
        )
    )
    # Control 1: the listener answers a container on a routed network (its gateway).
    routed = _gateway(client, test_network.name)
    seen = client.containers.run(
        PYTHON_IMAGE,
        ["python3", "-c", CONNECT_SCRIPT, _target(routed, host_listener)],
        network=test_network.name,
        remove=True,
    ).decode()
    assert f"{routed}:{host_listener}: {TOKEN}" in seen, seen

    def check(container: Container) -> tuple[str, dict[str, str]]:
        container.reload()
        internal = next(iter(container.attrs["NetworkSettings"]["Networks"]))
        addresses = {_gateway(client, internal), "172.17.0.1", *host_addresses()}
        targets = [_target(a, host_listener) for a in sorted(addresses)]
        assert len(_tagged(_tag_of(internal), "INPUT")) == 1, "the drop is in place"
        # Control 2: the same probe, from the sandbox, reaches its allowed forwarder.
        return internal, _connect_from(container, [*targets, "target.test:9000"])

    internal, results = asyncio.run(
        _with_instance(tmp_path, policy, check, egress_network=test_network.name)
    )
    tag = _tag_of(internal)
    assert _tagged(tag, "INPUT") == _tagged(tag, "DOCKER-USER") == [], "shutdown removes rules"
    assert results.pop("target.test:9000") == "echo ping", "the probe reaches the forwarder"
    assert len(results) >= 3, results  # the gateway, docker0 and this host's own address
    reached = {target: result for target, result in results.items() if TOKEN in result}
    assert reached == {}, f"a sandbox on {internal} reached the host: {reached}"
    assert all(result.startswith("failed") for result in results.values()), results


LISTENER_SCRIPT = """
import socket
server = socket.create_server(("0.0.0.0", 7000))
while True:
    connection, _ = server.accept()
    connection.sendall(b"instance-listener\\n"); connection.close()
"""


async def _two_instances(tmp_path: Path, policy: SandboxPolicy, check: Any, **settings: Any) -> Any:
    """Two per-session instances of one server under `policy`; run `check(first, second)`."""
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
        )
    )
    backend = await asyncio.to_thread(DockerBackend)
    supervisor = Supervisor(
        _settings(tmp_path, **settings),
        backend,
        registry,
        uuid.uuid4().hex[:16],
        seal=seal,
        sandbox_policy=lambda _name: policy,
    )
    await supervisor.start()
    try:
        first = await supervisor.acquire("probe", "session-1")
        second = await supervisor.acquire("probe", "session-2")
        client = docker.from_env()
        containers = [client.containers.get(i.container_id) for i in (first, second)]
        return await asyncio.to_thread(check, *containers)
    finally:
        await supervisor.shutdown()


def test_instances_on_one_egress_network_cannot_reach_each_other(
    tmp_path: Path,
    test_network: EgressLab,  # noqa: F811
) -> None:
    policy = SandboxPolicy(
        network=EgressPolicy(
            egress=("target.test:9000",), allow_addresses=(f"{test_network.target_address}/32",)
        )
    )

    def check(first: Container, second: Container) -> tuple[dict[str, str], dict[str, str]]:
        first.reload()
        second.reload()
        (network,) = first.attrs["NetworkSettings"]["Networks"]
        assert set(second.attrs["NetworkSettings"]["Networks"]) == {network}, "one network"
        address = first.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        first.exec_run(["python3", "-c", LISTENER_SCRIPT], user="10001:10001", detach=True)
        target = f"{address}:7000"
        # Control: the listener is up (the first instance reaches it on that same address).
        own = _connect_from(first, [target])
        return own, _connect_from(second, [target, "target.test:9000"])

    own, results = asyncio.run(
        _two_instances(tmp_path, policy, check, egress_network=test_network.name)
    )
    assert list(own.values()) == ["instance-listener"], own
    assert results.pop("target.test:9000") == "echo ping", "the probe reaches the forwarder"
    assert all(r.startswith("failed") for r in results.values()), results


def test_no_firewall_no_egress(
    tmp_path: Path,
    test_network: EgressLab,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon that cannot install the rules (no iptables here) refuses the server."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    policy = SandboxPolicy(network=EgressPolicy(egress=("target.test:9000",)))
    with pytest.raises(EgressError, match=r"egress for probe refused: no iptables"):
        asyncio.run(
            _with_instance(tmp_path, policy, lambda _c: None, egress_network=test_network.name)
        )
    # (_with_instance asserts that no egress network is left behind)


def _tag_of(network: str) -> str:
    """The comment on a gateway's rules: `stockade-egress-<daemon:8>-<key>` names it."""
    _, _, daemon, key = network.split("-")
    return f"stockade-egress/{daemon}/{key}"


def _tagged(firewall_tag: str, chain: str) -> list[str]:
    listing = subprocess.run(["iptables", "-S", chain], capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.splitlines() if firewall_tag in line]


def test_firewall_rules_are_idempotent_and_removed_by_key() -> None:
    daemon = uuid.uuid4().hex[:16]
    tag = f"stockade-egress/{daemon[:8]}/"
    firewall = EgressFirewall(daemon)
    bridge = f"stk{daemon[:8]}"  # no such interface: the rules match nothing
    try:
        firewall.confine("k1", bridge)
        firewall.confine("k1", bridge)
        assert len(_tagged(tag, "INPUT")) == 1
        assert f"-i {bridge}" in _tagged(tag, "INPUT")[0]
        firewall.allow_forwarders("k1", bridge, ["10.9.0.2"])
        firewall.allow_forwarders("k1", bridge, ["10.9.0.3"])  # the forwarder moved
        accepts = _tagged(tag, "DOCKER-USER")
        assert len(accepts) == 2 and all("10.9.0.3/32" in rule for rule in accepts), accepts
        # Accepts come before Docker's own rules (and the chain's RETURN).
        assert listing_position(tag) == [1, 2]
        assert firewall.keys() == {"k1"}
        assert firewall.release({"k1"}) >= 3  # INPUT (v4 and v6), two accepts
        assert _tagged(tag, "INPUT") == _tagged(tag, "DOCKER-USER") == []
    finally:
        firewall.release(firewall.keys())


def listing_position(tag: str) -> list[int]:
    listing = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True)
    rules = [line for line in listing.stdout.splitlines() if line.startswith("-A")]
    return [n for n, line in enumerate(rules, 1) if tag in line]


def test_rules_a_crash_left_behind_are_swept_at_the_first_prune(tmp_path: Path) -> None:
    daemon = uuid.uuid4().hex[:16]
    firewall = EgressFirewall(daemon)
    firewall.confine("deadbeef0000", f"stk{daemon[:8]}")  # no network has it
    tag = f"stockade-egress/{daemon[:8]}/"
    try:
        assert len(_tagged(tag, "INPUT")) == 1
        gateways = EgressGateways(DockerBackend(), _settings(tmp_path), daemon)
        assert gateways.prune(set()) == 0  # no gateway to remove...
        assert _tagged(tag, "INPUT") == []  # ...but the stray rule is gone
    finally:
        firewall.release(firewall.keys())
