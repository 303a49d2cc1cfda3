"""The Docker backend of the sandbox runtime: the only runtime code that imports `docker`.

Calls are synchronous (the docker SDK is); async callers run them with `asyncio.to_thread`.
Errors are translated into the typed `SandboxError` family so that callers decide on
lifecycle (gone vs refused vs engine down) without knowing Docker.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from stockade.logs import get_logger
from stockade.sandbox.errors import (
    ContainerGone,
    EngineUnavailable,
    ImageMissing,
    RuntimeMissing,
    SandboxError,
)
from stockade.sandbox.images import LABEL_RECIPE
from stockade.sandbox.runtime import Attachment, BridgeNetwork, ExitStatus, ImageInfo
from stockade.sandbox.spec import LABEL_MANAGED, ContainerSpec

log = get_logger("stockade.sandbox")
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
CONTAINER_LOG = {"max-size": "1m", "max-file": "1"}


def _create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """Docker create arguments for `spec`. Every hardened default is set here, explicitly."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command) or None,
        "working_dir": spec.working_dir,
        "user": spec.user,
        "labels": {LABEL_MANAGED: "true", **spec.labels},
        "runtime": spec.runtime,
        "network_mode": spec.network,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],  # and Docker's default seccomp profile
        "privileged": False,
        "mem_limit": spec.memory_bytes,
        "memswap_limit": spec.memory_bytes,  # no swap: the memory limit is the limit
        "nano_cpus": int(spec.cpus * 1_000_000_000),
        "pids_limit": spec.pids_limit,
        "tmpfs": {"/tmp": spec.tmpfs_options},  # noqa: S108 - the container's own /tmp
        "ipc_mode": "private",
        "init": True,  # docker-init (tini) as PID 1: forwards SIGTERM, reaps zombies
        "stdin_open": True,
        "tty": False,
        "detach": True,
        # The engine keeps its own copy of what a container writes; uncapped, a server
        # flooding its output would fill the engine's disk. One small file is enough for
        # `output` (readiness lines come first); the daemon reads everything else live.
        "log_config": LogConfig(type="json-file", config=CONTAINER_LOG),
    }
    if spec.cap_add:
        kwargs["cap_add"] = list(spec.cap_add)
    if spec.environment:
        kwargs["environment"] = dict(spec.environment)
    if spec.extra_hosts:
        kwargs["extra_hosts"] = dict(spec.extra_hosts)
    if spec.dns:
        kwargs["dns"] = list(spec.dns)
    if spec.dns_options:
        kwargs["dns_opt"] = list(spec.dns_options)
    if spec.mounts:
        kwargs["mounts"] = [
            Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
    if spec.bind_low_ports:
        # Namespaced to the container's network: lets a non-root process listen on 443.
        kwargs["sysctls"] = {"net.ipv4.ip_unprivileged_port_start": "0"}
    return kwargs


class DockerBackend:
    """Create, attach, start, stop, inspect and list sandbox containers."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        try:
            self._client = client or docker.from_env()
            self._client.ping()
        except docker.errors.DockerException as exc:
            raise EngineUnavailable(f"the Docker engine does not answer: {exc}") from None

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    def runtimes(self) -> set[str]:
        info: dict[str, Any] = self._client.info()
        return set(info.get("Runtimes", {}))

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; returns its id."""
        if spec.runtime != "runc" and spec.runtime not in self.runtimes():
            raise RuntimeMissing(
                f"runtime {spec.runtime!r} is not registered with the Docker engine; "
                "install it (scripts/docker-engine.sh registers runsc) - refusing to fall "
                "back to runc"
            )
        try:
            container: Container = self._client.containers.create(**_create_kwargs(spec))
        except docker.errors.ImageNotFound:
            raise ImageMissing(
                f"image {spec.image!r} is not present; build it with `stockade image build`"
            ) from None
        except docker.errors.APIError as exc:
            raise SandboxError(f"could not create a container from {spec.image!r}: {exc}") from None
        log.debug("container created", container=container.short_id, image=spec.image)
        return str(container.id)

    def image_digests(self, reference: str) -> tuple[str, ...]:
        """The image's id and registry digests (all `sha256:HEX`), to check a pin against."""
        try:
            details: dict[str, Any] = self._client.images.get(reference).attrs
        except docker.errors.ImageNotFound:
            raise ImageMissing(f"image {reference!r} is not present") from None
        except docker.errors.APIError as exc:
            raise SandboxError(f"could not inspect image {reference!r}: {exc}") from None
        digests = [str(details["Id"])]
        digests += [d.partition("@")[2] for d in details.get("RepoDigests") or []]
        return tuple(digests)

    def attach(self, container_id: str) -> Attachment:
        """Attach stdin/stdout/stderr. Do this before `start`, or early output is lost."""
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        try:
            wrapper = self._client.api.attach_socket(container_id, params=params)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container_id[:12]} is gone") from None
        raw = getattr(wrapper, "_sock", wrapper)
        if not isinstance(raw, socket.socket):
            raise SandboxError("the Docker engine connection is not a socket (unsupported host)")
        return Attachment(sock=raw.dup(), _keep=wrapper)

    def start(self, container_id: str) -> None:
        try:
            self._client.api.start(container_id)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container_id[:12]} is gone") from None
        except docker.errors.APIError as exc:
            raise SandboxError(f"could not start container {container_id[:12]}: {exc}") from None

    def wait(self, container_id: str, timeout: int | None = None) -> ExitStatus:
        """Block until the container exits (or raise on timeout); report how it ended."""
        try:
            self._client.api.wait(container_id, timeout=timeout)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container_id[:12]} is gone") from None
        return self.exit_status(container_id)

    def exit_status(self, container_id: str) -> ExitStatus:
        state = self.inspect(container_id)["State"]
        return ExitStatus(
            exit_code=int(state.get("ExitCode", -1)), oom_killed=bool(state.get("OOMKilled"))
        )

    def kill_gracefully(self, container_id: str, grace_seconds: float) -> None:
        """SIGTERM, wait up to `grace_seconds`, then SIGKILL; returns once it is down."""
        try:
            self._client.api.stop(container_id, timeout=max(0, round(grace_seconds)))
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container_id[:12]} is gone") from None

    def remove(self, container_id: str) -> None:
        """Remove the container (killing it if needed). Gone already is fine."""
        with contextlib.suppress(docker.errors.NotFound):
            self._client.api.remove_container(container_id, force=True)

    def stop(self, container_id: str, grace_seconds: float) -> ExitStatus | None:
        """SIGTERM, grace, SIGKILL, then remove; always. Returns how it ended (None: gone)."""
        try:
            self.kill_gracefully(container_id, grace_seconds)
            status = self.exit_status(container_id)
        except ContainerGone:
            return None
        except docker.errors.APIError as exc:
            log.warning("stop failed, forcing removal", container=container_id[:12], error=str(exc))
            status = None
        self.remove(container_id)
        return status

    def pids_limit_hits(self, container_id: str) -> int:
        """How often a fork failed on the pids limit (cgroup pids.events); 0 once it is gone.

        The cgroup disappears with the container, so callers sample this while it runs.
        """
        for path in (
            Path("/sys/fs/cgroup/pids/docker") / container_id / "pids.events",  # v1, cgroupfs
            Path("/sys/fs/cgroup/system.slice") / f"docker-{container_id}.scope" / "pids.events",
            Path("/sys/fs/cgroup/docker") / container_id / "pids.events",  # v2, cgroupfs
        ):
            try:
                text = path.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "max" and value.strip().isdigit():
                    return int(value)
        return 0

    def image_info(self, ref: str) -> ImageInfo:
        try:
            image = self._client.images.get(ref)
        except docker.errors.ImageNotFound:
            raise ImageMissing(f"image {ref!r} is not present on this Docker engine") from None
        except docker.errors.APIError as exc:
            raise SandboxError(f"could not inspect image {ref!r}: {exc}") from None
        attrs: dict[str, Any] = image.attrs
        config = attrs.get("Config") or {}
        return ImageInfo(
            id=str(image.id),
            repo_digests=tuple(attrs.get("RepoDigests") or ()),
            user=str(config.get("User") or ""),
            entrypoint=tuple(str(part) for part in config.get("Entrypoint") or ()),
            from_recipe=LABEL_RECIPE in (config.get("Labels") or {}),
        )

    def pull(self, ref: str) -> None:
        """Pull `ref` from its registry (registration only; never at run time)."""
        try:
            self._client.images.pull(ref)
        except docker.errors.APIError as exc:
            why = getattr(exc, "explanation", None) or str(exc)
            raise ImageMissing(
                f"image {ref!r} is not present and could not be pulled: {why}"
            ) from None
        except docker.errors.DockerException as exc:
            raise ImageMissing(f"image {ref!r} could not be pulled: {exc}") from None

    def inspect(self, container_id: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self._client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container_id[:12]} is gone") from None
        return result

    def list_by_label(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Containers (running or not) that carry all of `labels`, as `docker ps -a` summaries."""
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        result: list[dict[str, Any]] = self._client.api.containers(all=True, filters=filters)
        return result

    # -- networks (the egress gateway's) ---------------------------------------------

    def ensure_network(
        self,
        name: str,
        *,
        internal: bool,
        labels: dict[str, str],
        options: dict[str, str] | None = None,
    ) -> BridgeNetwork:
        """Create the bridge network unless it exists; check it is what we asked for."""
        options = options or {}
        try:
            network = self._client.networks.get(name)
        except docker.errors.NotFound:
            try:
                network = self._client.networks.create(
                    name,
                    driver="bridge",
                    internal=internal,
                    labels=labels,
                    options=options,
                    check_duplicate=True,
                )
            except docker.errors.APIError as exc:
                raise SandboxError(f"could not create network {name!r}: {exc}") from None
            network.reload()
        if bool(network.attrs.get("Internal")) != internal:
            raise SandboxError(
                f"network {name!r} exists but is not {'internal' if internal else 'routed'}"
            )
        actual = network.attrs.get("Options") or {}
        if any(actual.get(key) != value for key, value in options.items()):
            raise SandboxError(f"network {name!r} exists with other options than {options}")
        configs = network.attrs.get("IPAM", {}).get("Config") or []
        subnets = [c["Subnet"] for c in configs if "." in c.get("Subnet", "")]
        if not subnets:
            raise SandboxError(f"network {name!r} has no IPv4 subnet")
        # Docker names a bridge `br-<id:12>` unless the network names it.
        bridge = actual.get(BRIDGE_NAME_OPTION) or f"br-{str(network.id)[:12]}"
        return BridgeNetwork(subnet=str(subnets[0]), bridge=str(bridge))

    def connect_network(self, container_id: str, network: str) -> None:
        """Attach a created container to one more network (before it starts)."""
        try:
            self._client.api.connect_container_to_network(container_id, network)
        except docker.errors.NotFound as exc:
            raise SandboxError(
                f"cannot connect {container_id[:12]} to {network!r}: {exc}"
            ) from None

    def address_on(self, container_id: str, network: str) -> str:
        """The container's IPv4 address on `network` (it must be running)."""
        networks = self.inspect(container_id).get("NetworkSettings", {}).get("Networks", {})
        address = (networks.get(network) or {}).get("IPAddress")
        if not address:
            raise SandboxError(f"container {container_id[:12]} has no address on {network!r}")
        return str(address)

    def remove_network(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            try:
                self._client.api.remove_network(name)
            except docker.errors.APIError as exc:
                if exc.status_code != 404:
                    raise SandboxError(f"could not remove network {name!r}: {exc}") from None

    def networks_by_label(self, labels: dict[str, str]) -> list[str]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        return [str(n["Name"]) for n in self._client.api.networks(filters=filters)]

    def containers_on(self, network: str) -> list[str]:
        """Ids of the containers attached to `network` (empty if it is gone)."""
        try:
            attrs = self._client.api.inspect_network(network)
        except docker.errors.NotFound:
            return []
        return list((attrs.get("Containers") or {}).keys())

    def output(self, container_id: str) -> bytes:
        """What the container wrote to stdout so far (for readiness lines)."""
        try:
            result: bytes = self._client.api.logs(container_id, stdout=True, stderr=False)
        except docker.errors.NotFound:
            raise ContainerGone(f"container {container_id[:12]} is gone") from None
        return result
