"""Per-instance internal networks for servers that speak streamable HTTP in their container.

The daemon reaches such a server at its address on a network that only that one instance
and the host share: Docker `internal` (no route out, no published port), one per instance
so that two sessions' containers never see each other. A server with an egress allowlist
is already on its own internal egress network and uses that one instead. Networks go with
their instance; `prune` removes those a crash left behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from stockade.sandbox.errors import SandboxError
from stockade.sandbox.runtime import SandboxRuntime
from stockade.sandbox.spec import LABEL_INSTANCE, LABEL_PREFIX

LABEL_OWNER = f"{LABEL_PREFIX}.instance-network"  # the daemon id that owns the network
PREFIX = "stockade-inst-"
REMOVE_ATTEMPTS = 10


def network_name(instance_id: str) -> str:
    return PREFIX + instance_id


def ensure(backend: SandboxRuntime, daemon_id: str, instance_id: str) -> str:
    name = network_name(instance_id)
    labels = {LABEL_OWNER: daemon_id, LABEL_INSTANCE: instance_id}
    backend.ensure_network(name, internal=True, labels=labels)
    return name


def remove(backend: SandboxRuntime, instance_id: str) -> None:
    """Remove the network; the engine may still be detaching the removed container from
    it for a moment ("active endpoints"), so try again briefly before leaving it to
    `prune`."""
    for attempt in range(REMOVE_ATTEMPTS):
        try:
            backend.remove_network(network_name(instance_id))
            return
        except SandboxError:
            if attempt == REMOVE_ATTEMPTS - 1:
                raise
            time.sleep(0.2)


def prune(backend: SandboxRuntime, daemon_id: str, keep: Iterable[str]) -> None:
    """Remove this daemon's instance networks whose instance is not in `keep`."""
    wanted = {network_name(i) for i in keep}
    for name in backend.networks_by_label({LABEL_OWNER: daemon_id}):
        if name not in wanted and not backend.containers_on(name):
            backend.remove_network(name)
