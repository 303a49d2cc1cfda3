"""The egress gateway: a server with an egress allowlist reaches those destinations only.

Shape, per server and allowlist (a *gateway*):
- an `--internal` bridge network: containers on it have no route out of it;
- one forwarder container (image `stockade/egress`, `forwarder.py`) per allowed host, on that
  network and on the routed "outside" network, listening on the host's allowed ports;
- the server's containers join the internal network with `extra_hosts` mapping each allowed
  name to its forwarder. So `api.github.com:443` reaches the forwarder, which resolves the
  name afresh, refuses private/metadata addresses (SSRF guard) and relays bytes; TLS stays
  end to end. Other names do not resolve (the internal network's DNS does not forward, and
  the containers' upstream DNS is set to nowhere), and other addresses have no route.

Gateways are keyed by a hash of (server, allowlist): a policy change makes a new one, and
`prune` removes those no policy wants once no server container is left on them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from stockade.config import MiB, Settings
from stockade.logs import get_logger
from stockade.policy.sandbox import EgressPolicy
from stockade.sandbox.errors import SandboxError
from stockade.sandbox.runtime import SandboxRuntime
from stockade.sandbox.spec import LABEL_PREFIX, LABEL_SERVER, ContainerSpec

log = get_logger("stockade.egress")

EGRESS_IMAGE = "stockade/egress:latest"
LABEL_GATEWAY = f"{LABEL_PREFIX}.egress-gateway"
LABEL_GATEWAY_DAEMON = f"{LABEL_PREFIX}.egress-daemon"
LABEL_GATEWAY_HOST = f"{LABEL_PREFIX}.egress-host"
READY_TIMEOUT_SECONDS = 15.0
# Upstream DNS for sandboxes on an egress network: an address where nothing answers, so a
# name that is not allowed never resolves, whatever the engine's embedded DNS would forward.
NO_DNS = ("127.0.0.1",)
# ...and a name that is not allowed fails at once, instead of after the resolver's retries.
FAST_DNS_FAILURE = ("timeout:1", "attempts:1")


class EgressError(SandboxError):
    """The egress gateway could not be set up; the server is not started without it."""


@dataclass(frozen=True)
class EgressAttachment:
    """What a server container needs to use its gateway."""

    key: str
    network: str
    extra_hosts: dict[str, str]


def gateway_key(server: str, policy: EgressPolicy) -> str:
    text = json.dumps([server, policy.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class EgressGateways:
    """Creates, finds and removes gateways. Synchronous: call through `asyncio.to_thread`."""

    def __init__(self, backend: SandboxRuntime, settings: Settings, daemon_id: str) -> None:
        self._backend = backend
        self._settings = settings
        self._daemon_id = daemon_id

    def network_name(self, key: str) -> str:
        return f"stockade-egress-{self._daemon_id[:8]}-{key}"

    def ensure(self, server: str, policy: EgressPolicy) -> EgressAttachment:
        """The gateway for `server` under `policy`, created or reused; ready when returned."""
        key = gateway_key(server, policy)
        network = self.network_name(key)
        labels = {LABEL_GATEWAY: key, LABEL_GATEWAY_DAEMON: self._daemon_id}
        subnet = self._backend.ensure_network(network, internal=True, labels=labels)
        ports: dict[str, list[int]] = {}
        for destination in policy.destinations:
            ports.setdefault(destination.host, []).append(destination.port)
        running = self._running_forwarders(key)
        hosts: dict[str, str] = {}
        for host, host_ports in ports.items():
            container = running.get(host)
            if container is None:
                container = self._start_forwarder(
                    server,
                    key,
                    (network, subnet),
                    host,
                    ports=host_ports,
                    allow_addresses=policy.allow_addresses,
                )
                self._await_ready(container, host)
            hosts[host] = self._backend.address_on(container, network)
        return EgressAttachment(key=key, network=network, extra_hosts=hosts)

    def prune(self, wanted: set[str]) -> int:
        """Remove gateways whose key is not in `wanted` and that no server container uses."""
        removed = 0
        for network in self._backend.networks_by_label({LABEL_GATEWAY_DAEMON: self._daemon_id}):
            key = network.rsplit("-", 1)[-1]
            if key in wanted:
                continue
            forwarders = set(self._running_forwarders(key, running_only=False).values())
            if set(self._backend.containers_on(network)) - forwarders:
                continue  # a server instance still runs on it; it goes when that one does
            for container in forwarders:
                self._backend.stop(container, 0)
            self._backend.remove_network(network)
            log.info("egress gateway removed", network=network)
            removed += 1
        return removed

    # -- internals ----------------------------------------------------------------------

    def _running_forwarders(self, key: str, *, running_only: bool = True) -> dict[str, str]:
        """host -> container id of this gateway's forwarders."""
        result: dict[str, str] = {}
        for summary in self._backend.list_by_label({LABEL_GATEWAY: key}):
            if running_only and summary.get("State") != "running":
                self._backend.stop(summary["Id"], 0)
                continue
            host = (summary.get("Labels") or {}).get(LABEL_GATEWAY_HOST)
            if host:
                result[host] = summary["Id"]
        return result

    def _start_forwarder(
        self,
        server: str,
        key: str,
        internal: tuple[str, str],
        host: str,
        *,
        ports: list[int],
        allow_addresses: tuple[str, ...],
    ) -> str:
        network, subnet = internal
        command = ["--target", host, "--ports", ",".join(map(str, sorted(ports)))]
        command += ["--clients", subnet]
        for address in allow_addresses:
            command += ["--allow-address", address]
        spec = ContainerSpec(
            image=EGRESS_IMAGE,
            command=tuple(command),
            user=self._settings.container_user,
            network=network,
            memory_bytes=64 * MiB,
            cpus=0.5,
            pids_limit=32,
            tmpfs_bytes=MiB,
            bind_low_ports=True,
            labels={
                LABEL_GATEWAY: key,
                LABEL_GATEWAY_DAEMON: self._daemon_id,
                LABEL_GATEWAY_HOST: host,
                LABEL_SERVER: server,
            },
        )
        container = self._backend.create(spec)
        try:
            self._backend.connect_network(container, self._settings.egress_network)
            self._backend.start(container)
        except SandboxError:
            self._backend.stop(container, 0)
            raise
        log.info("egress forwarder started", server=server, host=host, ports=ports)
        return container

    def _await_ready(self, container: str, host: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if b"ready" in self._backend.output(container):
                return
            status = self._backend.inspect(container).get("State", {})
            if not status.get("Running"):
                self._backend.stop(container, 0)
                raise EgressError(f"the egress forwarder for {host} exited at start")
            time.sleep(0.05)
        self._backend.stop(container, 0)
        raise EgressError(f"the egress forwarder for {host} was not ready in time")
