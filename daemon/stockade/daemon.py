"""`stockaded`: the long-running daemon. Load settings once, configure logging once, serve."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from stockade import __version__, exitcodes, metrics
from stockade.api.activation import describe, relay_activated
from stockade.api.frames import FramedRelay
from stockade.api.server import ListenerError, start_framed_relay, start_server
from stockade.api.streams import StreamBudget
from stockade.audit.anchor import AuditRollback
from stockade.audit.log import AuditLog, AuditStartError, AuditUnavailable
from stockade.audit.startup import open_audit_log, open_state_seal, publish_state
from stockade.config import Settings, SettingsError, load_settings, setting_names
from stockade.http.front import HttpFront
from stockade.logs import configure_logging, get_logger
from stockade.paths import relay_socket_path
from stockade.pki.authority import CertificateAuthority, PkiError
from stockade.pki.tokens import TokenIssuer
from stockade.policy.store import PolicyError, PolicyStore
from stockade.registry import Registry, RegistryError
from stockade.relay.admission import Quotas
from stockade.relay.opening import SessionOpener
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.errors import EngineUnavailable
from stockade.secrets.delivery import SecretDelivery
from stockade.secrets.generation import open_anchored
from stockade.secrets.local import LocalSecretStore, load_master_key, master_key_id
from stockade.secrets.model import SecretError, SecretStore
from stockade.secrets.vault import VaultSecretStore
from stockade.state_seal import StateSeal, StateTampered, check_state_folders
from stockade.supervisor.supervisor import Supervisor, load_daemon_id
from stockade.systemd import listen_fds, notify, watchdog_interval

log = get_logger("stockade.daemon")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stockaded",
        description="The Stockade daemon: runs MCP servers in sandboxes and relays their traffic.",
        epilog="example: STOCKADE_LOG_LEVEL=debug stockaded --config /etc/stockade/stockaded.toml",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default: %(default)s)")
    parser.add_argument(
        "--help-settings", action="store_true", help="list every setting and its variable"
    )
    parser.add_argument("--version", action="version", version=f"stockaded {__version__}")
    parser.add_argument(
        "--accept-audit-gap",
        action="store_true",
        help="go on although the audit log was cut or rolled back (recorded first)",
    )
    parser.add_argument(
        "--accept-state-rollback",
        action="store_true",
        help="go on although a sealed state file was rolled back, replaced or removed, or a "
        "key swapped (recorded first)",
    )
    return parser.parse_args(argv)


async def _serve(
    settings: Settings, accept_audit_gap: bool = False, accept_state_rollback: bool = False
) -> None:
    # First of all, so that a SIGTERM during start-up is a clean stop, not a kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    check_state_folders(settings.state_dir, STATE_FOLDERS)
    leftovers = [name for name in STATE_MARKERS if (settings.state_dir / name).exists()]
    if any((settings.state_dir / "audit").glob("audit-*.jsonl")):
        leftovers = []  # a trail exists: it vouches (or not) for them itself
    daemon_id = load_daemon_id(settings.state_dir)
    audit = open_audit_log(settings, daemon_id, accept_gap=accept_audit_gap)
    audit_task = asyncio.create_task(audit.run(), name="audit")
    try:
        seal = await _open_state(settings, audit, daemon_id, accept_state_rollback, leftovers)
        await _serve_audited(settings, audit, seal, daemon_id, stop)
    finally:
        audit_task.cancel()
        await audit.close()


# Folders of the state folder that must be the daemon's own, and files whose presence means
# a daemon ran here before (with them but no audit trail, the trail was deleted).
STATE_FOLDERS = ("pki", "pki/admin", "audit", "audit-anchor", "shared")
STATE_MARKERS = ("daemon-id", "pki/ca.crt", "pki/ca.key", "servers.json", "secrets.json")


async def _open_state(
    settings: Settings,
    audit: AuditLog,
    daemon_id: str,
    accept_rollback: bool,
    leftovers: list[str],
) -> StateSeal:
    """The seal for the state folder, its floor checked against the trusted checkpoint.

    The sealed files themselves are checked as their owners load them (`_serve_audited`);
    the daemon's id on the engine is pinned here: changing it would orphan its containers."""
    seal = open_state_seal(settings, audit, accept_rollback=accept_rollback)
    async with _state_checked(audit):
        if leftovers:
            seal.trail_lost(leftovers)
        seal.pin("daemon id", daemon_id)
    return seal


async def _load_state(
    settings: Settings, audit: AuditLog, seal: StateSeal
) -> tuple[CertificateAuthority, TokenIssuer, Registry, SecretStore]:
    """What the state folder holds, each sealed file and pinned key checked; then anchored."""
    pki = settings.state_dir / "pki"
    async with _state_checked(audit):
        authority = CertificateAuthority.load_or_create(pki, seal)
        tokens = TokenIssuer(pki, seal)
        registry = Registry(settings.state_dir, seal)
        secrets = await open_anchored(
            audit, functools.partial(open_secret_store, settings, seal=seal)
        )
    authority.ensure_owner_admin()
    if seal.accepted:
        await audit.record(
            "state.rollback_accepted",
            durable=True,
            outcome="ok",
            detail={"problems": seal.accepted, "accepted_by": "stockaded --accept-state-rollback"},
        )
        log.warning("state rollback accepted by the operator", problems=seal.accepted)
    publish_state(audit, seal)  # from here on, every change is anchored at once
    return authority, tokens, registry, secrets


@contextlib.asynccontextmanager
async def _state_checked(audit: AuditLog) -> AsyncIterator[None]:
    """Loading sealed state: a refusal is a durable denial before the daemon stops."""
    try:
        yield
    except StateTampered as exc:
        with contextlib.suppress(AuditUnavailable):
            await audit.record("state.refused", durable=True, outcome="deny", reason=str(exc))
        raise


async def _serve_audited(
    settings: Settings, audit: AuditLog, seal: StateSeal, daemon_id: str, stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    policy = PolicyStore(settings.policy_dir, audit)  # a broken policy stops the start here
    loop.add_signal_handler(signal.SIGHUP, policy.reload)
    authority, tokens, registry, secrets = await _load_state(settings, audit, seal)
    backend = await asyncio.to_thread(DockerBackend)
    supervisor = Supervisor(
        settings,
        backend,
        registry,
        daemon_id,
        seal=seal,
        sandbox_policy=policy.sandbox,
        audit=audit,
        secrets=secrets,
        delivery=SecretDelivery(settings.secrets_runtime_dir, daemon_id),
    )
    await supervisor.start()
    opener = SessionOpener(
        registry,
        supervisor,
        policy,
        audit,
        max_message_bytes=settings.max_message_bytes,
        quotas=Quotas(
            sessions_per_identity=settings.quota_sessions_per_identity,
            http_sessions_per_identity=settings.quota_http_sessions_per_identity,
            opens_per_identity_per_minute=settings.quota_opens_per_identity_per_minute,
            instances_per_server=settings.quota_instances_per_server,
        ),
        notifications_per_second=settings.server_notifications_per_second,
    )
    listeners = await _start_listeners(
        settings,
        registry,
        supervisor,
        authority,
        opener,
        audit=audit,
        secrets=secrets,
        tokens=tokens,
    )
    addresses = listeners.addresses
    await audit.record("daemon.start", durable=True, outcome="ok", detail={"version": __version__})
    log.info(
        "stockaded started",
        version=__version__,
        listeners=addresses,
        daemon_id=supervisor.daemon_id,
        servers=len(registry.all()),
    )
    front = (
        HttpFront(settings, registry, opener, audit=audit, authority=authority, tokens=tokens)
        if settings.http_address
        else None
    )
    try:
        await _start_optional_listeners(settings, addresses, front, supervisor.pool_levels)
    except BaseException:
        await listeners.stop(grace=0)
        await supervisor.shutdown()
        raise
    notify("READY=1", f"STATUS=serving on {', '.join(addresses)}")
    watcher = asyncio.create_task(_watch_policy(policy))
    timeouts = asyncio.create_task(opener.expire_forever(settings.request_timeout_seconds))
    pinger = asyncio.create_task(_ping_watchdog(audit))
    await stop.wait()
    watcher.cancel()
    timeouts.cancel()
    pinger.cancel()
    notify("STOPPING=1", "STATUS=stopping: ending sessions and containers")
    log.info("stockaded stopping")
    if front is not None:
        await front.stop()
    await listeners.stop(grace=settings.stop_grace_seconds)
    await supervisor.shutdown()
    (listeners.private or settings.socket_path).unlink(missing_ok=True)  # never systemd's own
    with contextlib.suppress(AuditUnavailable):
        await audit.record("daemon.stop", durable=True, outcome="ok")
    log.info("stockaded stopped")


@dataclass
class _Listeners:
    """The relay and Control listeners: gRPC, the activated sockets' relays, framed."""

    server: grpc.aio.Server
    framed: FramedRelay
    relays: list[asyncio.Server]
    addresses: list[str]
    private: Path | None  # gRPC's own socket under socket activation

    async def stop(self, grace: float) -> None:
        for relay in self.relays:
            relay.close()
        await self.framed.stop()
        await self.server.stop(grace=grace)


async def _start_listeners(
    settings: Settings,
    registry: Registry,
    supervisor: Supervisor,
    authority: CertificateAuthority,
    opener: SessionOpener,
    *,
    audit: AuditLog,
    secrets: SecretStore,
    tokens: TokenIssuer,
) -> _Listeners:
    """gRPC (Control and Relay) and the framed relay; the supervisor is shut down on failure."""
    activated, framed_socket = _split_activated(listen_fds(), settings)
    private = settings.state_dir / "grpc.sock" if activated else None
    streams = StreamBudget(settings.max_relay_streams)  # gRPC and framed streams together
    try:
        server, addresses = await start_server(
            settings,
            registry,
            supervisor,
            authority,
            opener,
            audit=audit,
            secrets=secrets,
            tokens=tokens,
            streams=streams,
            unix_path=private,
        )
        relays = [await relay_activated(listener, private) for listener in activated if private]
    except BaseException:
        await supervisor.shutdown()
        raise
    try:
        framed, framed_addresses = await start_framed_relay(
            settings, authority, opener, audit=audit, streams=streams, activated=framed_socket
        )
    except BaseException:
        await server.stop(grace=0)
        await supervisor.shutdown()
        raise
    if activated:
        # In place: the Control API's status shows this same list.
        addresses[:1] = [describe(listener) for listener in activated]
    addresses.extend(framed_addresses)
    return _Listeners(server, framed, relays, addresses, private)


def _split_activated(
    activated: list[socket.socket], settings: Settings
) -> tuple[list[socket.socket], socket.socket | None]:
    """systemd's sockets for gRPC, and the one for the framed relay (its path), if passed."""
    relay_path = str(relay_socket_path(settings.socket_path))
    framed = [s for s in activated if s.family == socket.AF_UNIX and s.getsockname() == relay_path]
    return [s for s in activated if s not in framed], (framed[0] if framed else None)


def open_secret_store(
    settings: Settings, audited_generation: int = 0, *, seal: StateSeal | None = None
) -> SecretStore:
    """The configured secret backend, opened (a wrong master key, or a local store older
    than the audit trail's last recorded generation, stops the start)."""
    if settings.secrets_backend == "vault":
        if not settings.vault_address:
            raise SecretError("secrets_backend is vault but vault_address is not set")
        return VaultSecretStore(
            settings.vault_address,
            mount=settings.vault_mount,
            prefix=settings.vault_prefix,
            token_file=settings.vault_token_file,
            role_id=settings.vault_role_id,
            secret_id_file=settings.vault_secret_id_file,
            ca_bundle=settings.vault_ca_bundle,
        )
    key_file = settings.secrets_key_file or settings.state_dir / "master.key"
    master = load_master_key(key_file)
    store = LocalSecretStore(
        settings.state_dir / "secrets.json", master, audited_generation=audited_generation
    )
    if seal is not None:
        # A master key and store both swapped for ones the writer made would serve its
        # secrets to the servers: the key is pinned by an id derived from it (after the
        # store opened, so that a plainly wrong key says so first).
        seal.pin("master key", master_key_id(master))
    return store


# What stops the daemon at start, what it logs, and its exit code (see the README).
STARTUP_ERRORS: tuple[tuple[type[Exception], str, int], ...] = (
    (ListenerError, "cannot listen", exitcodes.FAILED),
    (EngineUnavailable, "cannot start without a container engine", exitcodes.UNREACHABLE),
    (RegistryError, "cannot load the server registry", exitcodes.CONFIG),
    (PkiError, "cannot set up the certificate authority", exitcodes.CONFIG),
    (PolicyError, "the policy is invalid", exitcodes.CONFIG),
    (AuditStartError, "the audit log is unusable", exitcodes.FAILED),
    (AuditRollback, "the audit log was rolled back", exitcodes.AUDIT_ROLLBACK),
    (SecretError, "cannot open the secret store", exitcodes.CONFIG),
    (StateTampered, "the state folder was tampered with", exitcodes.STATE_ROLLBACK),
)
POLICY_POLL_SECONDS = 2.0
STARTUP_FAILURES = tuple(kind for kind, _, _ in STARTUP_ERRORS)


async def _start_optional_listeners(
    settings: Settings,
    addresses: list[str],
    front: HttpFront | None,
    pool_levels: Callable[[], list[tuple[str, int, int, int]]],
) -> None:
    """The HTTP front and the metrics endpoint, when configured; added to `addresses`."""
    if front is not None:
        try:
            addresses.append(await front.start())
        except OSError as exc:
            raise ListenerError(f"cannot serve HTTP on {settings.http_address}: {exc}") from None
    if settings.metrics_address:
        try:
            metrics.serve(settings.metrics_address, pool_levels)
        except OSError as exc:
            if front is not None:
                await front.stop()
            raise ListenerError(
                f"cannot serve metrics on {settings.metrics_address}: {exc}"
            ) from None
        addresses.append(f"http://{settings.metrics_address}/metrics")


async def _ping_watchdog(audit: AuditLog) -> None:
    """WATCHDOG=1 while the event loop turns (a hung loop gets the daemon restarted)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1", f"STATUS=serving; audit {audit.state}")
        await asyncio.sleep(interval)


async def _watch_policy(policy: PolicyStore) -> None:
    """Reload the policy when a file in its folder changes (SIGHUP reloads at once)."""
    while True:
        await asyncio.sleep(POLICY_POLL_SECONDS)
        policy.reload_if_changed()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.help_settings:
        print("\n".join(setting_names()))
        return exitcodes.OK
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"stockaded: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(_serve(settings, args.accept_audit_gap, args.accept_state_rollback))
    except STARTUP_FAILURES as exc:
        what, code = next((w, c) for kind, w, c in STARTUP_ERRORS if isinstance(exc, kind))
        log.error(what, error=str(exc))
        return code
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
