"""Decide one request: allowed or not, by which rule, and why. Pure and fast (no I/O).

Combining rule (also in the README):
1. **Deny overrides.** A matching `deny` rule refuses the request, whatever else allows it.
   A deny rule's argument constraints narrow it: it applies when they all hold, or when a
   value cannot be vouched for (see `policy/constraints.py`).
2. **Allow** needs a matching `allow` rule whose argument constraints all hold (and, with
   `additional_arguments: false`, no argument the rule does not name).
3. **Session methods** (initialize, ping, list calls, notifications…) are allowed to a
   caller that some allow rule lets use the server at all; list answers are then filtered
   to what it may use.
4. **Default deny**: anything else is refused.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade.policy.constraints import CompiledArgument, Verdict, shown
from stockade.policy.loader import Policy
from stockade.policy.model import NAMED_METHODS, RateLimit, Rule
from stockade.wire.strict_json import fold_key

SERVER_CACHE_LIMIT = 1024
SESSION_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "logging/setLevel",
        "completion/complete",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "subscriptions/listen",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    }
)


@dataclass(frozen=True)
class Request:
    identity: str
    server: str
    method: str
    name: str | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None  # the deciding rule's name; None for the default
    source: str | None  # file:line of that rule
    reason: str
    audit_arguments: bool = False  # the deciding rule asks for full arguments in the audit


def _glob(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True)
class _CompiledRule:
    rule: Rule
    identities: re.Pattern[str]
    servers: re.Pattern[str]
    names: re.Pattern[str]
    any_method: bool
    validators: tuple[CompiledArgument, ...]
    named: frozenset[str]  # the argument names the rule lists
    folded: frozenset[str]  # the same, as `fold_key` forms

    @classmethod
    def of(cls, rule: Rule) -> _CompiledRule:
        checks = tuple(CompiledArgument.of(key, c) for key, c in rule.arguments.items())
        return cls(
            rule=rule,
            identities=_glob(rule.identities),
            servers=_glob(rule.servers),
            names=_glob(rule.names),
            any_method="*" in rule.methods,
            validators=checks,
            named=frozenset(check.name for check in checks),
            folded=frozenset(fold_key(check.name) for check in checks),
        )

    def covers(self, identity: str, server: str) -> bool:
        return bool(self.identities.match(identity) and self.servers.match(server))

    def matches(self, request: Request) -> bool:
        if not self.covers(request.identity, request.server):
            return False
        if not self.any_method and request.method not in self.rule.methods:
            return False
        if request.method in NAMED_METHODS:
            return request.name is not None and bool(self.names.match(request.name))
        return True

    def look_alike(self, arguments: Mapping[str, Any]) -> str | None:
        """An argument spelled like a constrained one but not exactly ("PATH", "path\\u0000").

        Some servers' parsers take it for the constrained argument, which the checks here
        would not have seen.
        """
        if not self.folded:
            return None
        return next(
            (k for k in arguments if k not in self.named and fold_key(k) in self.folded), None
        )

    def argument_problem(self, arguments: Mapping[str, Any]) -> str | None:
        """Why the arguments fail this (allow) rule's constraints, or None when they all hold."""
        name = self.rule.name
        alike = self.look_alike(arguments)
        if alike is not None:
            return f"argument {shown(alike)} looks like one rule {name!r} constrains"
        for check in self.validators:
            if check.name not in arguments:
                if check.optional:
                    continue
                return f"argument {check.name!r} is required by rule {name!r}"
            outcome = check.for_allow(arguments[check.name])
            if outcome.verdict is not Verdict.HOLDS:
                return f"argument {check.name!r} {outcome.why} (rule {name!r})"
        if not self.rule.additional_arguments:
            extra = next((key for key in arguments if key not in self.named), None)
            if extra is not None:
                return (
                    f"argument {shown(extra)} is not one rule {name!r} names "
                    "(additional_arguments: false)"
                )
        return None

    def deny_applies(self, arguments: Mapping[str, Any]) -> bool:
        """A deny rule applies when each constraint holds or cannot be vouched for."""
        if self.look_alike(arguments) is not None:
            return True
        return all(
            check.name in arguments and check.for_deny(arguments[check.name])
            for check in self.validators
        )


@dataclass(frozen=True)
class _CompiledLimit:
    limit: RateLimit
    identities: re.Pattern[str]
    servers: re.Pattern[str]
    names: re.Pattern[str]

    def covers(self, request: Request) -> bool:
        limit = self.limit
        if "*" not in limit.methods and request.method not in limit.methods:
            return False
        name = request.name or request.method
        return bool(
            self.identities.match(request.identity)
            and self.servers.match(request.server)
            and self.names.match(name)
        )


class Evaluator:
    """Decisions for one loaded policy. Build once per policy load; `decide` is hot."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._rules = [_CompiledRule.of(rule) for rule in policy.rules]
        self._limits = [
            _CompiledLimit(limit, _glob(limit.identities), _glob(limit.servers), _glob(limit.names))
            for limit in policy.rate_limits
        ]
        self._by_server: dict[str, tuple[list[_CompiledRule], list[_CompiledRule]]] = {}

    def _rules_for(self, server: str) -> tuple[list[_CompiledRule], list[_CompiledRule]]:
        """(denies, allows) whose server globs match `server`, in file order; cached.

        Most rules name one server, so this turns a scan of the whole policy into a scan of
        the few rules that can apply. The cache is bounded (servers are few; a flood of
        made-up names from `policy check` must not grow it without end).
        """
        cached = self._by_server.get(server)
        if cached is None:
            fitting = [c for c in self._rules if c.servers.match(server)]
            cached = (
                [c for c in fitting if c.rule.effect == "deny"],
                [c for c in fitting if c.rule.effect == "allow"],
            )
            if len(self._by_server) >= SERVER_CACHE_LIMIT:
                self._by_server.clear()
            self._by_server[server] = cached
        return cached

    def decide(self, request: Request) -> Decision:
        denies, allows = self._rules_for(request.server)
        for deny in denies:
            if deny.matches(request) and deny.deny_applies(request.arguments):
                return _said(deny, False, f"denied by rule {deny.rule.name!r}")
        near_miss: tuple[_CompiledRule, str] | None = None
        for allow in allows:
            if allow.matches(request):
                problem = allow.argument_problem(request.arguments)
                if problem is None:
                    return _said(allow, True, f"allowed by rule {allow.rule.name!r}")
                near_miss = near_miss or (allow, problem)
        if near_miss is not None:  # the rule that would allow it refuses these arguments
            return _said(near_miss[0], False, f"denied: {near_miss[1]}")
        if request.method in SESSION_METHODS:
            user = next((a for a in allows if a.covers(request.identity, request.server)), None)
            if user is not None:
                return _said(
                    user,
                    True,
                    f"session method; rule {user.rule.name!r} lets the caller use this server",
                )
        what = f"{request.method} {request.name}" if request.name else request.method
        return Decision(
            False,
            None,
            None,
            f"denied by default: no rule allows {request.identity} to call {what} "
            f"on {request.server}",
        )

    def limits_for(self, request: Request) -> list[RateLimit]:
        """The rate limits that cover an (allowed) request; each has its own bucket."""
        return [c.limit for c in self._limits if c.covers(request)]

    def may_see(self, identity: str, server: str, method: str, name: str) -> bool:
        """Whether a list answer should show `name` (a tool, prompt or resource) to the caller.

        Shown when some allow rule could admit a call to it (argument constraints are
        checked at call time) and no unconditional deny rule refuses it.
        """
        probe = Request(identity, server, method, name)
        denies, allows = self._rules_for(server)
        for deny in denies:
            if deny.matches(probe) and not deny.validators:
                return False
        return any(allow.matches(probe) for allow in allows)

    def may_use_method(self, identity: str, server: str, method: str) -> bool:
        """Whether some allow rule lets the caller use `method` on the server at all."""
        _, allows = self._rules_for(server)
        return any(
            a.covers(identity, server) and (a.any_method or method in a.rule.methods)
            for a in allows
        )

    def may_use_server(self, identity: str, server: str) -> bool:
        """Whether some allow rule lets the caller use the server at all (else: no session)."""
        _, allows = self._rules_for(server)
        return any(a.covers(identity, server) for a in allows)

    def server_request(self, server: str, method: str) -> Decision:
        """May this server send `method` (sampling, elicitation, roots) to the host?"""
        if method in self.policy.server_requests.get(server, frozenset()):
            return Decision(True, None, None, f"server_requests allows {method} for {server}")
        return Decision(
            False,
            None,
            None,
            f"denied by default: server {server!r} may not send {method} to hosts",
        )


def _said(compiled: _CompiledRule, allowed: bool, reason: str) -> Decision:
    rule = compiled.rule
    return Decision(allowed, rule.name, rule.source or None, reason, rule.audit_arguments)
