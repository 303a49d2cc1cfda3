"""The Control servicer: what operators ask the daemon (servers, sessions, status, logs)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc

from stockade import __version__
from stockade.api.convert import definition_from_proto, definition_to_proto, server_status_to_proto
from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger
from stockade.pki.authority import CertificateAuthority, PkiError
from stockade.pki.identity import Identity, IdentityError
from stockade.pki.tokens import TokenError, TokenIssuer
from stockade.registry import Registry, RegistryError, ServerExists, UnknownServer
from stockade.relay.opening import SessionOpener
from stockade.sandbox.errors import SandboxError
from stockade.secrets.generation import record_change
from stockade.secrets.model import (
    SecretBackendError,
    SecretError,
    SecretExists,
    SecretInfo,
    SecretNotFound,
    SecretStore,
)
from stockade.supervisor.supervisor import Supervisor
from stockade.v1 import control_pb2, control_pb2_grpc

log = get_logger("stockade.control")

Context = grpc.aio.ServicerContext[Any, Any]
FOLLOW_POLL_SECONDS = 0.2


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(
        self,
        listeners: list[str],
        registry: Registry,
        supervisor: Supervisor,
        opener: SessionOpener,
        authority: CertificateAuthority,
        *,
        audit: AuditLog,
        secrets: SecretStore,
        tokens: TokenIssuer,
    ) -> None:
        self._tokens = tokens
        self._authority = authority
        self._audit = audit
        self._secrets = secrets
        self._started = time.monotonic()
        self._listeners = listeners
        self._registry = registry
        self._supervisor = supervisor
        self._opener = opener  # the live sessions, and ending them on revocation

    async def GetStatus(
        self, request: control_pb2.GetStatusRequest, context: Context
    ) -> control_pb2.Status:
        return control_pb2.Status(
            version=__version__,
            uptime_seconds=time.monotonic() - self._started,
            listeners=self._listeners,
            servers=[server_status_to_proto(s) for s in self._supervisor.servers().values()],
            audit_state=self._audit.state,
            audit_records=self._audit.seq,
            audit_key_fingerprint=self._audit.key_fingerprint,
            audit_witnesses=[
                control_pb2.WitnessStatus(name=name, state=state, acknowledged_seq=seq)
                for name, state, seq in self._audit.witness_states()
            ],
        )

    async def AddServer(
        self, request: control_pb2.AddServerRequest, context: Context
    ) -> control_pb2.ServerDefinition:
        """Pin the image and (unless skip_check) prove the server answers, then register.

        Nothing is registered and no container is left when any step fails.
        """
        try:
            definition = definition_from_proto(request.server)
        except RegistryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # What the sandbox policy pins (image digest, command) a registration cannot change:
        # that is what keeps a server's secrets from being read by another program.
        pinned = await self._supervisor.check_pins(definition)
        if pinned is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused: {pinned}")
        if not request.replace and definition.name in {d.name for d in self._registry.all()}:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"server {definition.name!r} is already registered (use --replace to redefine it)",
            )
        try:
            definition = await self._supervisor.vet(
                definition,
                trial=not request.skip_check,
                timeout=float(request.check_timeout_seconds),
            )
        except SandboxError as exc:
            self._audit_registration(definition.name, "error", str(exc))
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"server {definition.name!r}: {exc}"
            )
        try:
            self._registry.add(definition, replace=request.replace)
        except ServerExists as exc:  # registered meanwhile by another caller
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except RegistryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._supervisor.server_added(definition)
        self._audit_registration(definition.name, "ok", "checked" if definition.checked else "")
        log.info("server registered", server=definition.name, image=definition.image)
        return definition_to_proto(definition)

    def _audit_registration(self, server: str, outcome: str, detail: str) -> None:
        with contextlib.suppress(AuditUnavailable):
            self._audit.write(
                "server.register", outcome=outcome, server=server, detail={"reason": detail}
            )

    async def ListServers(
        self, request: control_pb2.ListServersRequest, context: Context
    ) -> control_pb2.ListServersResponse:
        return control_pb2.ListServersResponse(
            servers=[definition_to_proto(d) for d in self._registry.all()]
        )

    async def GetServer(
        self, request: control_pb2.GetServerRequest, context: Context
    ) -> control_pb2.ServerDefinition:
        try:
            return definition_to_proto(self._registry.get(request.name))
        except UnknownServer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def ShowServer(
        self, request: control_pb2.GetServerRequest, context: Context
    ) -> control_pb2.ServerDetails:
        try:
            definition = self._registry.get(request.name)
        except UnknownServer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        effective, missing, state = await self._supervisor.details(definition)
        return control_pb2.ServerDetails(
            server=definition_to_proto(definition),
            sandbox=control_pb2.EffectiveSandbox(
                runtime=effective.runtime,
                memory_bytes=effective.memory_bytes,
                cpus=effective.cpus,
                pids_limit=effective.pids_limit,
                user=effective.user,
                egress=list(effective.egress),
                mounts=list(effective.mounts),
                capabilities=list(effective.capabilities),
                policy_source=effective.policy_source,
                image_pin=effective.image_pin,
            ),
            secrets=list(effective.secrets),
            missing_secrets=list(missing),
            status=server_status_to_proto(state) if state else None,
        )

    async def RemoveServer(
        self, request: control_pb2.RemoveServerRequest, context: Context
    ) -> control_pb2.RemoveServerResponse:
        try:
            self._registry.remove(request.name)
        except UnknownServer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except RegistryError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        await self._supervisor.server_removed(request.name)
        log.info("server removed", server=request.name)
        return control_pb2.RemoveServerResponse()

    async def ListSessions(
        self, request: control_pb2.ListSessionsRequest, context: Context
    ) -> control_pb2.ListSessionsResponse:
        sessions = [
            control_pb2.SessionInfo(
                id=session.id,
                server=session.server,
                identity=session.identity,
                instance=session.instance,
                started_at=session.started_at,
            )
            for session in self._opener.live.values()
            if not request.server or session.server == request.server
        ]
        return control_pb2.ListSessionsResponse(sessions=sessions)

    async def IssueCertificate(
        self, request: control_pb2.IssueCertificateRequest, context: Context
    ) -> control_pb2.IssuedCertificate:
        try:
            identity = Identity.make(request.role or "host", request.name)
        except IdentityError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        issued = self._authority.issue_client(identity)
        log.info("certificate issued", subject=issued.identity, serial=str(issued.serial))
        return control_pb2.IssuedCertificate(
            identity=issued.identity,
            serial=str(issued.serial),
            key_pem=issued.key_pem,
            cert_pem=issued.cert_pem,
            ca_pem=issued.ca_pem,
            not_after=issued.not_after.isoformat(),
        )

    async def RevokeCertificate(
        self, request: control_pb2.RevokeCertificateRequest, context: Context
    ) -> control_pb2.RevokeCertificateResponse:
        if bool(request.serial) == bool(request.identity):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "give either a serial or an identity"
            )
        try:
            if request.serial:
                serials = [int(request.serial)]
            else:
                uri = request.identity
                if not uri.startswith("spiffe://"):
                    role, _, name = uri.partition("/")
                    uri = Identity.make(role, name).uri
                serials = self._authority.serials_of(uri)
                if not serials:
                    raise PkiError(f"no certificate was issued to {uri}")
            identities = {self._authority.revoke(serial) for serial in serials}
        except (PkiError, IdentityError, ValueError) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        identity = identities.pop() if len(identities) == 1 else ""
        if request.identity:  # and every bearer token that identity holds
            self._tokens.revoke(identity=uri)  # on the loop: its save signs a checkpoint
        await self._opener.revoke(
            f"credential revoked: certificate {', '.join(str(s) for s in serials)}",
            credentials={f"cert:{serial}" for serial in serials},
            identity=uri if request.identity else "",
        )
        log.warning("certificate revoked", subject=identity, serials=[str(s) for s in serials])
        return control_pb2.RevokeCertificateResponse(
            identity=identity, serials=[str(s) for s in serials]
        )

    async def ListCertificates(
        self, request: control_pb2.ListCertificatesRequest, context: Context
    ) -> control_pb2.ListCertificatesResponse:
        return control_pb2.ListCertificatesResponse(
            certificates=[
                control_pb2.CertificateInfo(
                    serial=str(serial), identity=identity, not_after=not_after, revoked=revoked
                )
                for serial, identity, not_after, revoked in self._authority.issued()
            ]
        )

    async def IssueToken(
        self, request: control_pb2.IssueTokenRequest, context: Context
    ) -> control_pb2.IssuedToken:
        try:
            identity = Identity.make("host", request.name)
            self._registry.get(request.server)
            token = self._tokens.issue(identity.uri, request.server, request.ttl_seconds or 3600)
        except (IdentityError, TokenError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownServer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("token issued", subject=token.identity, server=token.audience, id=token.token_id)
        return control_pb2.IssuedToken(
            token=token.value,
            identity=token.identity,
            server=token.audience,
            expires=datetime.fromtimestamp(token.expires, UTC).isoformat(),
            token_id=token.token_id,
        )

    async def RevokeToken(
        self, request: control_pb2.RevokeTokenRequest, context: Context
    ) -> control_pb2.RevokeTokenResponse:
        if not request.token_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a token id")
        self._tokens.revoke(token_id=request.token_id)  # on the loop: it signs a checkpoint
        await self._opener.revoke(
            f"credential revoked: token {request.token_id}",
            credentials={f"token:{request.token_id}"},
        )
        log.warning("token revoked", id=request.token_id)
        return control_pb2.RevokeTokenResponse()

    async def SetSecret(
        self, request: control_pb2.SetSecretRequest, context: Context
    ) -> control_pb2.SecretInfo:
        try:
            info = await asyncio.to_thread(
                self._secrets.set, request.name, request.value, rotate=request.rotate
            )
        except SecretError as exc:
            await context.abort(_secret_status(exc), str(exc))
        log.info(  # never the value
            "secret set",
            secret=info.name,
            version=info.version,
            line_ending_stripped=info.line_ending_stripped,
        )
        await record_change(
            self._audit, self._secrets, info.name, "rotate" if request.rotate else "set"
        )
        self._supervisor.secret_changed(info.name)
        return _secret_to_proto(info)

    async def ListSecrets(
        self, request: control_pb2.ListSecretsRequest, context: Context
    ) -> control_pb2.ListSecretsResponse:
        try:
            infos = await asyncio.to_thread(self._secrets.list)
        except SecretError as exc:
            await context.abort(_secret_status(exc), str(exc))
        return control_pb2.ListSecretsResponse(secrets=[_secret_to_proto(i) for i in infos])

    async def RemoveSecret(
        self, request: control_pb2.RemoveSecretRequest, context: Context
    ) -> control_pb2.RemoveSecretResponse:
        try:
            await asyncio.to_thread(self._secrets.remove, request.name)
        except SecretError as exc:
            await context.abort(_secret_status(exc), str(exc))
        log.info("secret removed", secret=request.name)
        await record_change(self._audit, self._secrets, request.name, "rm")
        self._supervisor.secret_changed(request.name)
        return control_pb2.RemoveSecretResponse()

    async def GetServerLogs(
        self, request: control_pb2.GetServerLogsRequest, context: Context
    ) -> AsyncIterator[control_pb2.LogLine]:
        try:
            self._registry.get(request.server)
        except UnknownServer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        seen: dict[str, int] = {}
        while True:
            instances = self._supervisor.instances_of(request.server, request.session or None)
            for instance in instances:
                for line in instance.stderr.since(seen.get(instance.id, 0)):
                    yield control_pb2.LogLine(
                        instance=instance.id, session=instance.session_id or "", line=line
                    )
                seen[instance.id] = instance.stderr.total
            if not request.follow:
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)


def _secret_status(exc: SecretError) -> grpc.StatusCode:
    if isinstance(exc, SecretNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, SecretExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, SecretBackendError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


def _secret_to_proto(info: SecretInfo) -> control_pb2.SecretInfo:
    return control_pb2.SecretInfo(
        name=info.name,
        backend=info.backend,
        created=info.created,
        rotated=info.rotated,
        version=info.version,
        line_ending_stripped=info.line_ending_stripped,
    )
