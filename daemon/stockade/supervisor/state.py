"""The supervisor's live bookkeeping for one registered server (pool, in use, history)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from stockade.registry import ServerDefinition
from stockade.relay.shared import SharedRouter
from stockade.sandbox.instance import ExitReport, Instance

# Exit reports kept per server for `stockade server status`.
EXIT_HISTORY = 20


@dataclass
class ServerState:
    """Live bookkeeping for one registered server."""

    definition: ServerDefinition
    pool: deque[Instance] = field(default_factory=deque)
    in_use: dict[str, Instance] = field(default_factory=dict)  # instance id -> instance
    starting: int = 0
    restarts: int = 0
    exits: deque[tuple[float, str, ExitReport]] = field(
        default_factory=lambda: deque(maxlen=EXIT_HISTORY)
    )
    router: SharedRouter | None = None  # shared servers only
    runner: asyncio.Task[None] | None = None  # keeps the shared instance running
