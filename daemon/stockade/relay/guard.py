"""The access policy applied to one session's traffic, both directions.

- host -> server: every request and notification is decided; a refused request is answered
  with POLICY_DENIED (naming the rule and why) and never reaches the server;
- server -> host: a server's own request (sampling, elicitation, roots) is refused unless
  the policy lists it for that server; the server gets the error, the host never sees it;
- list answers (tools, prompts, resources, templates) are filtered to what the caller may
  use, so a host is never shown a tool it could not call.

Reasons never contain argument values: they name the rule and the constraint only.

Every decision is an audit record (`request`, `server_request`): a denial is on disk before
the caller hears of it; an allowed request is written before it is forwarded (fsynced in a
group). If the audit log cannot be written, requests are refused with AUDIT_UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger
from stockade.metrics import RELAY_LATENCY, REQUESTS
from stockade.policy.evaluator import Request
from stockade.policy.model import NAMED_METHODS
from stockade.policy.store import PolicyStore
from stockade.relay import jsonrpc
from stockade.relay.budget import HostBudget, capped
from stockade.relay.jsonrpc import Kind, Message
from stockade.secrets.redact import Redactor

log = get_logger("stockade.policy")

# list method -> (result key, item field, the method that uses an item)
LIST_ITEMS: dict[str, tuple[str, str, str]] = {
    "tools/list": ("tools", "name", "tools/call"),
    "prompts/list": ("prompts", "name", "prompts/get"),
    "resources/list": ("resources", "uri", "resources/read"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", "resources/read"),
}

# The budget key of a server's notifications dropped past its rate (`relay/flow.py`).
DROPPED_NOTIFICATIONS = "server-notifications-dropped"

# capability (in initialize / server/discover results) -> the method that uses it
CAPABILITY_METHODS = {
    "tools": "tools/call",
    "prompts": "prompts/get",
    "resources": "resources/read",
}


def _target(message: Message) -> tuple[str | None, dict[str, Any]]:
    """The name (tool, prompt, URI) and arguments a request acts on."""
    params = message.params or {}
    key = NAMED_METHODS.get(message.method or "")
    name = params.get(key) if key else None
    arguments = params.get("arguments") if message.method in ("tools/call", "prompts/get") else None
    return (
        name if isinstance(name, str) else None,
        arguments if isinstance(arguments, dict) else {},
    )


def _completion_target(message: Message) -> tuple[str, str | None] | None:
    """For `completion/complete`: the method and name its `ref` uses, else None."""
    if message.method != "completion/complete":
        return None
    ref = (message.params or {}).get("ref")
    if not isinstance(ref, dict):
        return ("prompts/get", None)  # no ref: decided as an unnamed prompt (denied)
    if ref.get("type") == "ref/resource":
        uri = ref.get("uri")
        return ("resources/read", uri if isinstance(uri, str) else None)
    name = ref.get("name")
    return ("prompts/get", name if isinstance(name, str) else None)


# json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False), made once.
_DIGEST_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def arguments_digest(arguments: dict[str, Any]) -> str | None:
    """SHA-256 of the canonical JSON arguments: proves what was sent, shows nothing."""
    if not arguments:
        return None
    return hashlib.sha256(_DIGEST_ENCODER.encode(arguments).encode()).hexdigest()


class PolicyGuard:
    def __init__(
        self,
        store: PolicyStore,
        server: str,
        identity: str,
        audit: AuditLog,
        *,
        session: str | None = None,
        instance: str | None = None,
        redactor: Callable[[], Redactor | None] = lambda: None,
        budget: HostBudget | None = None,
    ) -> None:
        self._budget = budget or HostBudget()
        self._redactor = redactor  # granted secrets (of the instance now serving), for records
        self._store = store
        self.server = server
        self.identity = identity
        self._audit = audit
        self._where = {"server": server, "identity": identity, "session": session}
        self.instance = instance
        # Metric series of this server, looked up once (a labels() lookup takes a lock).
        self._counted: dict[str, Any] = {}
        self._latency: Any = None

    def _count(self, outcome: str) -> None:
        series = self._counted.get(outcome)
        if series is None:
            series = self._counted[outcome] = REQUESTS.labels(self.server, outcome)
        series.inc()

    async def _record(self, event: str, *, durable: bool, **fields: Any) -> None:
        await self._audit.record(
            event, durable=durable, instance=self.instance, **self._where, **fields
        )

    async def check_host(self, message: Message) -> bytes | None:
        """None: forward it. Otherwise what to answer the host (b"" for a notification)."""
        if message.kind is Kind.RESPONSE:
            return None  # the host answering a server request the guard let through
        assert message.method is not None  # noqa: S101 - requests and notifications have one
        try:
            return await self._decide_host(message)
        except AuditUnavailable as exc:
            if message.kind is Kind.NOTIFICATION:
                return b""
            return jsonrpc.error_response(
                message.id,
                jsonrpc.AUDIT_UNAVAILABLE,
                f"refused: {exc}; Stockade does not relay what it cannot audit",
            )

    async def _decide_host(self, message: Message) -> bytes | None:
        assert message.method is not None  # noqa: S101 - checked by the caller
        if message.kind is Kind.NOTIFICATION and not self._budget.notification_allowed(
            self.identity
        ):
            count = self._budget.due("notifications-dropped", self.identity, self.server)
            if count is not None:
                await self._record(
                    "request",
                    durable=False,
                    outcome="deny",
                    action="notifications",
                    reason="notification rate of this identity exceeded; dropped",
                    count=count,
                )
            return b""
        name, arguments = _target(message)
        request = Request(self.identity, self.server, message.method, name, arguments)
        decision = self._store.evaluator.decide(request)
        completed = _completion_target(message)
        if decision.allowed and completed is not None:
            # Completing a prompt's or a resource template's arguments reveals what using it
            # would: the caller must be allowed to use that prompt or resource.
            method, target = completed
            decision = self._store.evaluator.decide(
                Request(self.identity, self.server, method, target, {})
            )
        fields = {
            "action": capped(message.method),
            "target": capped(name),
            "args_sha256": arguments_digest(arguments),
            "rule": decision.rule,
            "rule_source": decision.source,
            "arguments": self._recorded(arguments) if decision.audit_arguments else None,
        }
        if decision.allowed:
            refusal = self._rate_limit(message, request)
            self._count("allow" if refusal is None else "deny")
            if refusal is not None:
                return await self._denied(message, fields, "rate limit reached", refusal)
            await self._record("request", durable=False, outcome="allow", **fields)
            return None
        self._count("deny")
        error = jsonrpc.error_response(
            message.id,
            jsonrpc.POLICY_DENIED,
            f"denied by policy: {capped(decision.reason)}",
            {"rule": decision.rule, "source": decision.source},
        )
        return await self._denied(message, fields, decision.reason, error)

    async def _denied(
        self, message: Message, fields: dict[str, Any], reason: str, error: bytes
    ) -> bytes:
        """Record a denial within this identity's budget; what to answer the host with."""
        reason = capped(reason) or ""  # a reason may quote the caller's own strings
        answer = b"" if message.kind is Kind.NOTIFICATION else error
        if not self._budget.denial_allowed(self.identity):
            count = self._budget.due("denials-over-budget", self.identity, self.server)
            if count is not None:
                await self._record(
                    "request",
                    durable=True,
                    outcome="deny",
                    action="requests",
                    reason="this identity is refused too often; denials are summarised",
                    count=count,
                )
            if not answer:
                return answer
            return jsonrpc.error_response(
                message.id,
                jsonrpc.RATE_LIMITED,
                "too many refused requests from this identity; slow down",
            )
        key = (str(fields["action"]), str(fields["target"]), reason)
        count = self._budget.due("denial", self.identity, self.server, *key)
        if count is not None:  # else: said within this window; counted for the next record
            await self._record(
                "request", durable=True, outcome="deny", **fields, reason=reason, count=count
            )
            log.warning(
                "policy denied a request",
                method=fields["action"],
                name=fields["target"],
                rule=fields.get("rule"),
                reason=reason,
                count=count,
            )
        return answer

    async def server_notifications_dropped(self) -> None:
        """A server notification dropped past its rate: on record once a window, counted."""
        count = self._budget.due(DROPPED_NOTIFICATIONS, self.identity, self.server)
        if count is None:
            return
        with contextlib.suppress(AuditUnavailable):  # dropped either way
            await self._record(
                "server_notification",
                durable=False,
                outcome="deny",
                action="notifications",
                reason="notification rate of this server exceeded; dropped",
                count=count,
            )

    async def refuse(self, message: Message, code: int, reason: str) -> bytes:
        """A host message the relay itself refuses (not the policy): recorded, answered."""
        fields = {"action": capped(message.method or "response"), "target": None}
        try:
            if message.kind is Kind.RESPONSE:  # nothing to answer: dropped, on record
                await self._denied(message, fields, reason, b"")
                return b""
            error = jsonrpc.error_response(message.id, code, reason)
            return await self._denied(message, fields, reason, error)
        except AuditUnavailable:
            if message.kind is not Kind.REQUEST:
                return b""
            return jsonrpc.error_response(message.id, jsonrpc.AUDIT_UNAVAILABLE, "refused")

    async def malformed(self, code: int, reason: str, request_id: Any) -> bytes:
        """A host message that did not parse: on record (within budget), and the error."""
        error = jsonrpc.error_response(request_id, code, reason)
        fields = {"action": "malformed", "target": None}
        with contextlib.suppress(AuditUnavailable):  # refused either way
            await self._denied_unparsed(fields, capped(reason) or "", error)
        return error

    async def _denied_unparsed(self, fields: dict[str, Any], reason: str, error: bytes) -> None:
        if not self._budget.denial_allowed(self.identity):
            return  # summarised with the other denials over budget
        count = self._budget.due("denial", self.identity, self.server, "malformed", "", reason)
        if count is not None:
            await self._record(
                "request", durable=True, outcome="deny", **fields, reason=reason, count=count
            )

    def may_read(self, uri: str) -> bool:
        """Whether the policy lets this caller read `uri` (resources/read), for routing."""
        return self._store.evaluator.may_see(self.identity, self.server, "resources/read", uri)

    async def summarise(self) -> None:
        """Record the repeats of this identity's denials not yet on record (session end)."""
        for key, count in self._budget.unsaid(self.identity):
            kind, _, server, *rest = key
            if server != self.server:
                continue
            event = "server_notification" if kind == DROPPED_NOTIFICATIONS else "request"
            with contextlib.suppress(AuditUnavailable):
                await self._record(
                    event,
                    durable=True,
                    outcome="deny",
                    action=rest[0] if rest else kind,
                    target=rest[1] if len(rest) > 1 else None,
                    reason=(rest[2] if len(rest) > 2 else kind) + " (repeats)",
                    count=count,
                )

    def _rate_limit(self, message: Message, request: Request) -> bytes | None:
        if message.kind is not Kind.REQUEST:
            return None
        for limit in self._store.evaluator.limits_for(request):
            key = (
                limit.name,
                self.identity,
                self.server,
                capped(request.name or request.method) or "",
            )
            wait = self._store.limiter.take(key, limit.per_minute, limit.burst)
            if wait > 0:  # logged with the denial record, once per window
                return jsonrpc.error_response(
                    message.id,
                    jsonrpc.RATE_LIMITED,
                    f"rate limit {limit.name!r} ({limit.per_minute}/min, burst {limit.burst})"
                    f" reached; retry in {wait:.1f} s",
                    {"limit": limit.name, "retry_after_seconds": round(wait, 3)},
                )
        return None

    def _recorded(self, arguments: dict[str, Any]) -> Any:
        """Full arguments for the audit, with every granted secret replaced by its name."""
        redactor = self._redactor()
        if redactor is None:
            return arguments
        redacted, _ = redactor.apply(jsonrpc.encode(arguments))
        return json.loads(redacted)

    async def check_server_request(self, message: Message) -> bytes | None:
        """None: forward it to the host. Otherwise the error to answer the server with."""
        assert message.method is not None  # noqa: S101 - a request has one
        decision = self._store.evaluator.server_request(self.server, message.method)
        method = capped(message.method)
        reason = None if decision.allowed else capped(decision.reason)
        # A server repeating a refused request is said once per window, with the count: a
        # server must not be able to grow the audit log (or the daemon's) at will.
        count = (
            1
            if decision.allowed
            else self._budget.due(
                "server-request", self.identity, self.server, method or "", reason or ""
            )
        )
        try:
            if count is not None:
                await self._record(
                    "server_request",
                    durable=not decision.allowed,
                    outcome="allow" if decision.allowed else "deny",
                    action=method,
                    rule=decision.rule,
                    reason=reason,
                    count=None if decision.allowed else count,
                )
        except AuditUnavailable as exc:
            return jsonrpc.error_response(message.id, jsonrpc.AUDIT_UNAVAILABLE, f"refused: {exc}")
        if decision.allowed:
            return None
        if count is not None:
            log.warning("policy denied a server request", method=method, reason=reason)
        return jsonrpc.error_response(
            message.id, jsonrpc.POLICY_DENIED, f"denied by policy: {reason}"
        )

    def _filter_capabilities(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Drop the tools/prompts/resources capabilities the caller may not use at all."""
        result = body.get("result")
        capabilities = result.get("capabilities") if isinstance(result, dict) else None
        if not isinstance(result, dict) or not isinstance(capabilities, dict):
            return None
        evaluator = self._store.evaluator
        hidden = [
            capability
            for capability, using in CAPABILITY_METHODS.items()
            if capability in capabilities
            and not evaluator.may_use_method(self.identity, self.server, using)
        ]
        return _without(body, result, hidden) if hidden else None

    def answered(self, method: str, started: float, body: dict[str, Any]) -> None:
        """Record how an allowed request ended: its latency and outcome."""
        error = body.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        elapsed = time.monotonic() - started
        if self._latency is None:
            self._latency = RELAY_LATENCY.labels(self.server)
        self._latency.observe(elapsed)
        with contextlib.suppress(AuditUnavailable):  # refused from the next request on
            self._audit.write(
                "response",
                instance=self.instance,
                **self._where,
                action=method,
                outcome="error" if error is not None else "ok",
                error_code=code,
                latency_ms=round(elapsed * 1000, 3),
            )

    def filter_list(self, method: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to a list request with only what the caller may use (None: unchanged)."""
        if method in ("server/discover", "initialize"):
            return self._filter_capabilities(body)
        shape = LIST_ITEMS.get(method)
        result = body.get("result")
        if shape is None or not isinstance(result, dict):
            return None
        key, field, using = shape
        items = result.get(key)
        if not isinstance(items, list):
            return None
        evaluator = self._store.evaluator
        kept = [
            item
            for item in items
            if isinstance(item, dict)
            and isinstance(item.get(field), str)
            and evaluator.may_see(self.identity, self.server, using, item[field])
        ]
        if len(kept) == len(items):
            return None
        return {**body, "result": {**result, key: kept}}


def _without(body: dict[str, Any], result: dict[str, Any], hidden: list[str]) -> dict[str, Any]:
    capabilities = {k: v for k, v in result["capabilities"].items() if k not in hidden}
    return {**body, "result": {**result, "capabilities": capabilities}}
