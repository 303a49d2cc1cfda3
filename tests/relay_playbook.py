"""Drive the relay core with no Docker: a fake instance, a real guard and a real audit log.

In the style of mitmproxy's layer playbooks: feed messages in from either side, and look at
what came out on the other, and at what the audit log recorded. Runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.audit.log import AuditLog
from stockade.policy.store import PolicyStore
from stockade.relay.budget import HostBudget
from stockade.relay.guard import PolicyGuard
from stockade.sandbox.instance import ExitReport

A = "spiffe://stockade.local/host/a"
B = "spiffe://stockade.local/host/b"


def message(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def request(request_id: Any, method: str, **params: Any) -> bytes:
    return message({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def notification(method: str, **params: Any) -> bytes:
    return message({"jsonrpc": "2.0", "method": method, "params": params})


def result(request_id: Any, value: Any) -> bytes:
    return message({"jsonrpc": "2.0", "id": request_id, "result": value})


class FakeInstance:
    """Stands where a sandboxed container is: records what the relay sends it."""

    def __init__(self, instance_id: str = "i-1") -> None:
        self.id = instance_id
        self.sent: list[dict[str, Any]] = []
        self.sent_raw: list[bytes] = []
        self.exited: asyncio.Future[ExitReport] = asyncio.get_running_loop().create_future()
        self.redaction = None
        self._sink: Any = None

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def redactor(self) -> None:
        return None

    redact = None  # no granted secrets

    def bind(self, sink: Any) -> None:
        self._sink = sink

    async def send(self, raw: bytes) -> None:
        self.sent_raw.append(raw)
        self.sent.append(json.loads(raw))

    async def says(self, raw: bytes) -> None:
        """The server writes one line to stdout (what it causes has been delivered on return)."""
        await self._sink(raw)
        await settle()


async def settle() -> None:
    """A few turns of the loop: queued deliveries (a shared host's outbox) are done."""
    for _ in range(5):
        await asyncio.sleep(0)


class Host:
    """A host's receiving side: what the relay wrote to it, decoded."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    async def __call__(self, raw: bytes) -> None:
        self.got.append(json.loads(raw))

    def answer(self, request_id: Any) -> dict[str, Any]:
        found = [m for m in self.got if m.get("id") == request_id and "method" not in m]
        assert len(found) == 1, f"{len(found)} answers to {request_id!r}: {self.got}"
        return found[0]


class Playbook:
    """Policy files and an audit log in a folder, and guards made from them."""

    def __init__(self, folder: Path, policy: str) -> None:
        (folder / "policies").mkdir(parents=True, exist_ok=True)
        (folder / "policies" / "test.yaml").write_text(policy)
        self.audit = AuditLog(folder / "audit", Ed25519PrivateKey.generate(), daemon_id="play")
        self.audit.open()
        self.store = PolicyStore(folder / "policies", self.audit)
        self.budget = HostBudget()
        self._folder = folder

    def guard(self, identity: str, server: str = "srv", session: str = "s") -> PolicyGuard:
        return PolicyGuard(
            self.store, server, identity, self.audit, session=session, budget=self.budget
        )

    def records(self, **fields: Any) -> list[dict[str, Any]]:
        found = []
        for path in sorted((self._folder / "audit").glob("audit-*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if all(record.get(k) == v for k, v in fields.items()):
                    found.append(record)
        return found

    def audit_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self._folder / "audit").glob("audit-*.jsonl"))
