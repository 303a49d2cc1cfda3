"""The local secret store's generation, anchored in the signed audit trail.

Every change to the local store (set, rotate, rm) raises its generation; the daemon then
writes a durable `secret.change` record holding it and signs a checkpoint at once. Every
checkpoint carries the newest generation (`secrets_generation`), and the daemon keeps a
copy of its last checkpoint outside the audit folder (`audit/anchor.py`), which is checked
against the log before the store is opened. So at load, `audited_generation` is the
generation of the last change the trail vouches for, and a store older than that is refused.

A refused store is itself a durable `secret.store_refused` record (a denial) before the
daemon stops. A backend without a generation (Vault keeps its own versions) is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.secrets.local import LocalSecretStore
from stockade.secrets.model import SecretStore, SecretStoreRolledBack

SECRETS_GENERATION = "secrets_generation"  # the checkpoint field


def audited_generation(audit: AuditLog) -> int:
    """The newest generation the trusted audit head records (0: none yet)."""
    return int(audit.checkpoint_fields.get(SECRETS_GENERATION, 0))


async def open_anchored(audit: AuditLog, open_store: Callable[[int], SecretStore]) -> SecretStore:
    """Open the store no older than the audited generation (`open_store` takes it)."""
    try:
        store = await asyncio.to_thread(open_store, audited_generation(audit))
    except SecretStoreRolledBack as exc:
        with contextlib.suppress(AuditUnavailable):
            await audit.record(
                "secret.store_refused", durable=True, outcome="deny", reason=str(exc)
            )
        raise
    anchor_store(audit, store)
    return store


def anchor_store(audit: AuditLog, store: SecretStore) -> None:
    """From now on, every checkpoint carries this store's generation."""
    if isinstance(store, LocalSecretStore):
        audit.checkpoint_fields[SECRETS_GENERATION] = store.generation


async def record_change(audit: AuditLog, store: SecretStore, name: str, action: str) -> None:
    """A durable record of the change with the store's generation, then a checkpoint."""
    if not isinstance(store, LocalSecretStore):
        return
    anchor_store(audit, store)
    await audit.record(
        "secret.change",
        durable=True,
        outcome="ok",
        action=action,
        target=name,
        detail={"generation": store.generation},
    )
    audit.checkpoint()
