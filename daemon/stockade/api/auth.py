"""Deny-by-default authentication for every RPC, of all four kinds.

Each RPC method has a rule naming the roles that may call it; a method without a rule is
refused, whatever servicer exists for it. The caller's identity comes from its client
certificate (mTLS is required on every listener, so the handshake already proved it holds
the key to a certificate this CA issued). Revocation is checked here, on every call, against
the CA's revoked serials (updated in-process when `cert revoke` runs). The identity is bound
into the log context for everything the call does.

grpc.aio interceptors cannot see the peer certificate, so the interceptor wraps the handler
it is given and checks inside it, where `context.auth_context()` is available.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, cast

import grpc

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger, log_context
from stockade.pki.authority import CertificateAuthority
from stockade.pki.identity import (
    Identity,
    IdentityError,
    PeerCertificate,
    Role,
    peer_from_pem,
)

log = get_logger("stockade.auth")

ADMIN_ONLY: frozenset[Role] = frozenset({"admin"})
HOSTS_AND_ADMINS: frozenset[Role] = frozenset({"admin", "host"})

RELAY_METHOD = "/stockade.v1.Relay/Connect"

# The whole API surface: every method and who may call it. Nothing else answers.
METHOD_RULES: Mapping[str, frozenset[Role]] = {
    RELAY_METHOD: HOSTS_AND_ADMINS,
    "/stockade.v1.Control/GetStatus": ADMIN_ONLY,
    "/stockade.v1.Control/AddServer": ADMIN_ONLY,
    "/stockade.v1.Control/ListServers": ADMIN_ONLY,
    "/stockade.v1.Control/GetServer": ADMIN_ONLY,
    "/stockade.v1.Control/ShowServer": ADMIN_ONLY,
    "/stockade.v1.Control/RemoveServer": ADMIN_ONLY,
    "/stockade.v1.Control/ListSessions": ADMIN_ONLY,
    "/stockade.v1.Control/GetServerLogs": ADMIN_ONLY,
    "/stockade.v1.Control/IssueCertificate": ADMIN_ONLY,
    "/stockade.v1.Control/RevokeCertificate": ADMIN_ONLY,
    "/stockade.v1.Control/ListCertificates": ADMIN_ONLY,
    "/stockade.v1.Control/IssueToken": ADMIN_ONLY,
    "/stockade.v1.Control/RevokeToken": ADMIN_ONLY,
    "/stockade.v1.Control/SetSecret": ADMIN_ONLY,
    "/stockade.v1.Control/ListSecrets": ADMIN_ONLY,
    "/stockade.v1.Control/RemoveSecret": ADMIN_ONLY,
}

Context = grpc.aio.ServicerContext[Any, Any]

# The verified caller of the RPC being served, for servicers that record who did what.
current_identity: ContextVar[Identity | None] = ContextVar("stockade_identity", default=None)
# The credential it presented ("cert:SERIAL"), so that revoking it can end its streams.
current_credential: ContextVar[str | None] = ContextVar("stockade_credential", default=None)


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_certificate(
    pem: bytes | None, authority: CertificateAuthority, roles: frozenset[Role], action: str
) -> PeerCertificate:
    """The verified identity (and serial) of a caller's certificate, or `Denied`.

    The one check for every mTLS listener (gRPC here, the framed relay in api/frames.py):
    the TLS handshake proved the caller holds a key to a certificate this CA issued; this
    reads its identity, refuses a revoked serial and a role that may not do `action`.
    """
    if not pem:
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
    try:
        peer = peer_from_pem(pem)
    except (IdentityError, ValueError) as exc:
        raise Denied(
            grpc.StatusCode.UNAUTHENTICATED, f"unusable client certificate: {exc}"
        ) from None
    if peer.serial in authority.revoked:
        raise Denied(
            grpc.StatusCode.UNAUTHENTICATED,
            f"certificate {peer.serial} ({peer.identity.uri}) has been revoked",
        )
    if peer.identity.role not in roles:
        raise Denied(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{peer.identity.uri} (role {peer.identity.role}) may not call {action}",
        )
    return peer


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authority: CertificateAuthority, audit: AuditLog) -> None:
        self._authority = authority
        self._audit = audit

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        roles = METHOD_RULES.get(method)
        handler = await continuation(handler_call_details)
        if roles is None or handler is None:
            log.warning("refused an unknown method", method=method)
            return _refusal(grpc.StatusCode.UNIMPLEMENTED, f"no such method: {method}")
        return _wrap(handler, method, roles, self._authority, self._audit)


def _authorize(
    context: Context, method: str, roles: frozenset[Role], ca: CertificateAuthority
) -> PeerCertificate:
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    return check_certificate(bytes(pems[0]) if pems else None, ca, roles, method)


def _presented_identity(context: Context) -> str:
    """The identity the refused caller's certificate names ("" when none can be read)."""
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    with contextlib.suppress(IdentityError, ValueError):
        return peer_from_pem(bytes(pems[0])).identity.uri if pems else ""
    return ""


@contextlib.contextmanager
def _as_caller(peer: PeerCertificate) -> Iterator[None]:
    """The verified caller, bound for the servicer (contextvars) and the log."""
    identity = current_identity.set(peer.identity)
    credential = current_credential.set(f"cert:{peer.serial}")
    try:
        with log_context(identity=peer.identity.uri):
            yield
    finally:
        current_identity.reset(identity)
        current_credential.reset(credential)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    roles: frozenset[Role],
    ca: CertificateAuthority,
    audit: AuditLog,
) -> grpc.RpcMethodHandler[Any, Any]:
    # The stubs model sync handlers; ours are coroutines or async generators.
    factory: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    if handler.unary_unary is not None:
        inner = cast(Callable[..., Any], handler.unary_unary)
        factory = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream is not None:
        inner = cast(Callable[..., Any], handler.unary_stream)
        factory = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary is not None:
        inner = cast(Callable[..., Any], handler.stream_unary)
        factory = grpc.stream_unary_rpc_method_handler
    else:
        inner = cast(Callable[..., Any], handler.stream_stream)
        factory = grpc.stream_stream_rpc_method_handler

    async def check(context: Context) -> PeerCertificate:
        try:
            return _authorize(context, method, roles, ca)
        except Denied as exc:
            log.warning("refused a call", method=method, reason=str(exc))
            with contextlib.suppress(AuditUnavailable):  # refused either way
                await audit.record(
                    "access",
                    durable=True,
                    outcome="deny",
                    action=method,
                    reason=str(exc),
                    identity=_presented_identity(context),  # `audit tail --identity` finds it
                    peer=context.peer(),
                )
            await context.abort(exc.code, str(exc))
            raise  # abort() raises; if it ever did not, the call still never runs

    if inspect.isasyncgenfunction(inner):

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            peer = await check(context)
            with _as_caller(peer):
                async for item in inner(request, context):
                    yield item

        behaviour: Callable[..., Any] = streaming
    else:

        async def calling(request: Any, context: Context) -> Any:
            peer = await check(context)
            identity = peer.identity
            if method.startswith(CONTROL_PREFIX):
                await _admin_record(audit, context, method, identity, "requested")
            outcome = "error"
            try:
                with _as_caller(peer):
                    answer = await inner(request, context)
                outcome = "ok"
                return answer
            finally:
                if method.startswith(CONTROL_PREFIX) and method not in READ_ONLY:
                    with contextlib.suppress(AuditUnavailable):
                        audit.write("admin", outcome=outcome, action=method, identity=identity.uri)

        behaviour = calling
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


CONTROL_PREFIX = "/stockade.v1.Control/"
READ_ONLY = frozenset(
    CONTROL_PREFIX + name
    for name in (
        "GetStatus",
        "ListServers",
        "GetServer",
        "ShowServer",
        "ListSessions",
        "ListCertificates",
        "ListSecrets",
    )
)


async def _admin_record(
    audit: AuditLog, context: Context, method: str, identity: Identity, outcome: str
) -> None:
    """Admin actions are recorded before they run; if that fails, they do not run."""
    if method in READ_ONLY:
        return
    try:
        await audit.record(
            "admin",
            durable=True,
            outcome=outcome,
            action=method,
            identity=identity.uri,
            peer=context.peer(),
        )
    except AuditUnavailable as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"refused: {exc}")


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: Any, context: Context) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
