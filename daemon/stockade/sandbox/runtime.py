"""The runtime interface the supervisor needs from a container engine.

`DockerBackend` implements it; nothing above this interface knows Docker. Calls are
synchronous (the supervisor runs them with `asyncio.to_thread`) and raise the typed
errors of `stockade.sandbox.errors`.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from stockade.sandbox.spec import ContainerSpec


@dataclass(frozen=True)
class ExitStatus:
    """How a container ended: its exit code, and whether the kernel OOM-killed it."""

    exit_code: int
    oom_killed: bool


@dataclass(frozen=True)
class BridgeNetwork:
    """A bridge network: its IPv4 subnet (CIDR) and its host interface."""

    subnet: str
    bridge: str


@dataclass
class Attachment:
    """A container's stdin/stdout/stderr as one socket (multiplexed output, raw input).

    `sock` is a private duplicate of the engine connection, so asyncio can own it; `_keep`
    holds the SDK's wrapper so that its finaliser does not close the connection under us.
    """

    sock: socket.socket
    _keep: Any

    def shutdown(self) -> None:
        """End the connection itself, not only a descriptor of it.

        The SDK's wrapper holds another descriptor of the same connection, which closing
        ours leaves open; then dockerd stays blocked writing output nobody reads and cannot
        finish stopping the container. A shutdown ends the connection for every holder.
        """
        with contextlib.suppress(OSError):  # already closed, or ended by the engine
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
        with contextlib.suppress(OSError):
            self._keep.close()


@dataclass(frozen=True)
class ImageInfo:
    """A local image as registration pins it."""

    id: str  # sha256:...
    repo_digests: tuple[str, ...]
    user: str  # the image's own USER ("" = root)
    entrypoint: tuple[str, ...] = ()  # the image's own ENTRYPOINT
    from_recipe: bool = False  # built from Stockade's recipes (`io.stockade.recipe-hash`)


class SandboxRuntime(Protocol):
    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a hardened container; return its id."""

    def image_digests(self, reference: str) -> tuple[str, ...]:
        """The image's id and registry digests (`sha256:HEX`), to check a pin against."""

    def attach(self, container_id: str) -> Attachment:
        """stdin/stdout/stderr as one socket; call before `start`."""

    def start(self, container_id: str) -> None: ...

    def wait(self, container_id: str, timeout: int | None = None) -> ExitStatus: ...

    def kill_gracefully(self, container_id: str, grace_seconds: float) -> None:
        """SIGTERM, a grace period, then SIGKILL."""

    def remove(self, container_id: str) -> None: ...

    def stop(self, container_id: str, grace_seconds: float) -> ExitStatus | None:
        """`kill_gracefully`, then `remove`; always."""

    def inspect(self, container_id: str) -> dict[str, Any]: ...

    def image_info(self, ref: str) -> ImageInfo:
        """The local image `ref` (id, repository digests, USER); ImageMissing if absent."""
        ...

    def list_by_label(self, labels: dict[str, str]) -> list[dict[str, Any]]: ...

    def pids_limit_hits(self, container_id: str) -> int: ...

    # Networks, for the egress gateway.
    def ensure_network(
        self,
        name: str,
        *,
        internal: bool,
        labels: dict[str, str],
        options: dict[str, str] | None = None,
    ) -> BridgeNetwork:
        """Create the bridge network unless it exists; its IPv4 subnet and host interface."""

    def connect_network(self, container_id: str, network: str) -> None: ...

    def address_on(self, container_id: str, network: str) -> str: ...

    def remove_network(self, name: str) -> None: ...

    def networks_by_label(self, labels: dict[str, str]) -> list[str]: ...

    def containers_on(self, network: str) -> list[str]: ...

    def output(self, container_id: str) -> bytes: ...
