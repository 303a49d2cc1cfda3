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
- host firewall rules (`firewall.py`), installed before anything joins the network, drop
  everything from it to the host itself (Docker's internal bridge answers on every host
  address), and with ICC off let sandboxes reach their forwarders and not each other. No
  rule, no gateway: the server is refused (fail closed).

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
from stockade.sandbox.firewall import EgressFirewall, FirewallError
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
# ICC off: Docker drops traffic between containers on the network; the firewall module then
# lets sandboxes reach their forwarders and nothing else (not another instance).
NETWORK_OPTIONS = {"com.docker.network.bridge.enable_icc": "false"}
LAYOUT = 2  # 2: ICC off, host firewall rules, IPv4-in-IPv6 forms refused by the forwarder


class EgressError(SandboxError):
    """The egress gateway could not be set up; the server is not started without it."""


@dataclass(frozen=True)
class EgressAttachment:
    """What a server container needs to use its gateway."""

    key: str
    network: str
    extra_hosts: dict[str, str]


def gateway_key(server: str, policy: EgressPolicy) -> str:
    """Names the gateway; a new layout (or forwarder) version makes new ones, and `prune`
    removes those an older daemon made (e.g. with ICC on)."""
    text = json.dumps([LAYOUT, server, policy.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class EgressGateways:
    """Creates, finds and removes gateways. Synchronous: call through `asyncio.to_thread`."""

    def __init__(self, backend: SandboxRuntime, settings: Settings, daemon_id: str) -> None:
        self._backend = backend
        self._settings = settings
        self._daemon_id = daemon_id
        self._firewall = EgressFirewall(daemon_id)
        self._swept = False

    def network_name(self, key: str) -> str:
        return f"stockade-egress-{self._daemon_id[:8]}-{key}"

    def ensure(self, server: str, policy: EgressPolicy) -> EgressAttachment:
        """The gateway for `server` under `policy`, created or reused; ready when returned.

        Fail closed: if the host firewall rules cannot be installed, the gateway is removed
        (unless a running instance still uses it) and `EgressError` says why.
        """
        key = gateway_key(server, policy)
        network = self.network_name(key)
        labels = {LABEL_GATEWAY: key, LABEL_GATEWAY_DAEMON: self._daemon_id}
        bridge = self._backend.ensure_network(
            network, internal=True, labels=labels, options=NETWORK_OPTIONS
        )
        try:
            self._firewall.confine(key, bridge.bridge)  # before anything joins the network
        except FirewallError as exc:
            self._remove_if_unused(network, key)
            raise EgressError(f"egress for {server} refused: {exc}") from None
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
                    (network, bridge.subnet),
                    host,
                    ports=host_ports,
                    allow_addresses=policy.allow_addresses,
                )
                self._await_ready(container, host)
            hosts[host] = self._backend.address_on(container, network)
        try:
            self._firewall.allow_forwarders(key, bridge.bridge, list(hosts.values()))
        except FirewallError as exc:
            self._remove_if_unused(network, key)
            raise EgressError(f"egress for {server} refused: {exc}") from None
        return EgressAttachment(key=key, network=network, extra_hosts=hosts)

    def prune(self, wanted: set[str]) -> int:
        """Remove gateways whose key is not in `wanted` and that no server container uses.

        Their firewall rules go with them; rules left by a crash (no network any more) are
        swept at the first prune and whenever a gateway went.
        """
        removed = 0
        live: set[str] = set()
        for network in self._backend.networks_by_label({LABEL_GATEWAY_DAEMON: self._daemon_id}):
            key = network.rsplit("-", 1)[-1]
            if key in wanted or not self._remove_if_unused(network, key):
                live.add(key)
                continue
            log.info("egress gateway removed", network=network)
            removed += 1
        if removed or not self._swept:
            try:
                self._firewall.release(self._firewall.keys() - live)
                self._swept = True
            except FirewallError as exc:
                log.warning("egress firewall rules not swept", error=str(exc))
        return removed

    # -- internals ----------------------------------------------------------------------

    def _remove_if_unused(self, network: str, key: str) -> bool:
        """Remove the gateway (forwarders, network, rules) unless a server instance is on it."""
        forwarders = set(self._running_forwarders(key, running_only=False).values())
        if set(self._backend.containers_on(network)) - forwarders:
            return False  # a server instance still runs on it; it goes when that one does
        for container in forwarders:
            self._backend.stop(container, 0)
        self._backend.remove_network(network)
        try:
            self._firewall.release({key})
        except FirewallError as exc:  # swept at a later prune
            log.warning("egress firewall rules not removed", network=network, error=str(exc))
        return True

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
