"""The policy file schema (pydantic). Security teams write these; keep every field obvious.

```yaml
version: 1
rules:
  - name: hosts-read-data              # shown in every decision it makes
    effect: allow                      # or deny; a matching deny always wins
    identities: ["spiffe://stockade.local/host/*"]   # globs over the caller's SAN URI
    servers: ["filesystem"]            # globs over registered server names
    methods: ["tools/call"]            # exact MCP methods, or "*"
    names: ["read_*"]                  # globs over the tool / prompt name or resource URI
    arguments:                         # every listed argument must satisfy its constraint
      path: {path: {under: /data}}     # an absolute path inside /data ("." and "//" resolved)
      paths[]: {path: {under: /data}}  # an array; every element must satisfy the constraint
      mode: {pattern: "r|rw"}          # a regular expression matching the WHOLE value
      limit: {schema: {type: integer, maximum: 100}, optional: true}  # JSON schema; may be absent
    additional_arguments: false        # refuse arguments not listed above (allow rules only)
    audit_arguments: false             # true: the audit keeps full arguments, not a digest
server_requests:                       # what a server may ask the host (default: nothing)
  everything: ["sampling/createMessage", "roots/list"]
rate_limits:                           # token buckets, one per caller x server x name
  - name: ten-a-minute
    identities: ["spiffe://stockade.local/host/*"]
    servers: ["*"]
    per_minute: 10
    burst: 3
sandboxes:                             # how each server's container runs (policy/sandbox.py)
  time: {memory_mb: 128}
quotas:                                # override the quota settings; the lowest match wins
  - identities: ["spiffe://stockade.local/host/ci"]
    sessions_per_identity: 64
  - servers: ["github"]
    instances_per_server: 4
```
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stockade.policy.sandbox import SandboxPolicy

# Methods whose target has a name (tool, prompt, resource URI) that rules can match.
NAMED_METHODS: dict[str, str] = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}
SERVER_REQUEST_METHODS = ("sampling/createMessage", "elicitation/create", "roots/list")
# JSON-schema formats the installed checker really checks; any other `format` would pass
# everything silently, so a policy naming one is refused.
CHECKED_FORMATS = frozenset(Draft202012Validator.FORMAT_CHECKER.checkers)


class PathConstraint(BaseModel):
    """An absolute path under one of `under` (itself, or below it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    under: tuple[str, ...] = Field(min_length=1)

    @field_validator("under", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("under")
    @classmethod
    def _absolute(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        for root in roots:
            if not root.startswith("/") or any(ord(c) < 0x20 or c == "\x7f" for c in root):
                raise ValueError(f"{root!r}: `under` takes absolute paths (starting with /)")
            if ".." in root.split("/"):
                raise ValueError(f"{root!r}: write the path without '..'")
        return tuple(posixpath.normpath("/" + root.lstrip("/")) for root in roots)


class ArgumentConstraint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    path: PathConstraint | None = None
    # The argument may be absent; when present it must satisfy the constraint (allow rules).
    optional: bool = False
    # `pattern` only: the value may hold line breaks and tabs (never NUL or other controls).
    multiline: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> ArgumentConstraint:
        given = [self.pattern is not None, self.schema_ is not None, self.path is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of `pattern`, `schema` or `path`")
        if self.multiline and self.pattern is None:
            raise ValueError("`multiline` applies to `pattern` only")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        if self.schema_ is not None:
            try:
                Draft202012Validator.check_schema(self.schema_)
            except SchemaError as exc:
                raise ValueError(f"invalid JSON schema: {exc.message}") from None
            unknown = sorted(_formats(self.schema_) - CHECKED_FORMATS)
            if unknown:
                raise ValueError(
                    f"format {', '.join(unknown)} cannot be checked here (checked: "
                    f"{', '.join(sorted(CHECKED_FORMATS))}); use `pattern` instead"
                )
        return self


def _formats(schema: Any) -> set[str]:
    """Every `format` a schema fragment asks for, at any depth."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("format"), str):
                found.add(item["format"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    effect: Literal["allow", "deny"]
    identities: tuple[str, ...] = Field(min_length=1)
    servers: tuple[str, ...] = Field(min_length=1)
    methods: tuple[str, ...] = Field(min_length=1)
    names: tuple[str, ...] = ("*",)
    # Argument name -> constraint; `name[]` means an array whose every element satisfies it.
    arguments: dict[str, ArgumentConstraint] = Field(default_factory=dict)
    # False: a call with an argument the rule does not name is refused (allow rules only).
    additional_arguments: bool = True
    # Record the full arguments of the requests this rule decides (granted secrets redacted);
    # otherwise the audit log keeps only their SHA-256.
    audit_arguments: bool = False
    # Where the rule was written: filled by the loader, for explanations.
    source: str = Field(default="", exclude=True)

    @field_validator("methods")
    @classmethod
    def _known_shape(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        for method in methods:
            if method != "*" and "/" not in method and method not in ("initialize", "ping"):
                raise ValueError(f"{method!r} is not an MCP method (e.g. tools/call) or '*'")
        return methods

    @field_validator("arguments")
    @classmethod
    def _argument_names(
        cls, arguments: dict[str, ArgumentConstraint]
    ) -> dict[str, ArgumentConstraint]:
        names = [key.removesuffix("[]") for key in arguments]
        for key, name in zip(arguments, names, strict=True):
            if not name or name.endswith("[]"):
                raise ValueError(f"{key!r}: an argument name, or a name followed by []")
            if names.count(name) > 1:
                raise ValueError(f"argument {name!r} is constrained twice")
        return arguments

    @model_validator(mode="after")
    def _allow_only_options(self) -> Rule:
        if self.effect == "deny":
            if not self.additional_arguments:
                raise ValueError("additional_arguments applies to allow rules only")
            optional = [k for k, c in self.arguments.items() if c.optional]
            if optional:
                raise ValueError(
                    f"`optional` applies to allow rules only (here: {', '.join(optional)})"
                )
        return self

    @model_validator(mode="after")
    def _arguments_need_named_methods(self) -> Rule:
        if self.arguments and self.effect == "allow":
            unnamed = [m for m in self.methods if m != "*" and m not in NAMED_METHODS]
            if unnamed:
                raise ValueError(
                    f"argument constraints apply to {', '.join(NAMED_METHODS)}; "
                    f"not to {', '.join(unnamed)}"
                )
        return self


class RateLimit(BaseModel):
    """At most `per_minute` calls a minute, in bursts of up to `burst`, for each caller x
    server x name that the limit covers (each has its own bucket)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    identities: tuple[str, ...] = Field(min_length=1)
    servers: tuple[str, ...] = Field(min_length=1)
    methods: tuple[str, ...] = ("tools/call",)
    names: tuple[str, ...] = ("*",)
    per_minute: int = Field(ge=1, le=1_000_000)
    burst: int = Field(ge=1, le=1_000_000)


class QuotaOverride(BaseModel):
    """Quotas for the identities x servers it covers, in place of the settings' defaults.

    Where several entries cover a session, the lowest value of each quota wins: an entry
    can raise a default, but never another entry's limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identities: tuple[str, ...] = Field(default=("*",), min_length=1)
    servers: tuple[str, ...] = Field(default=("*",), min_length=1)
    sessions_per_identity: int | None = Field(default=None, ge=1, le=100_000)
    http_sessions_per_identity: int | None = Field(default=None, ge=1, le=100_000)
    opens_per_identity_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    instances_per_server: int | None = Field(default=None, ge=1, le=100_000)
    source: str = Field(default="", exclude=True)


class PolicyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1]
    rules: tuple[Rule, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    server_requests: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    sandboxes: dict[str, SandboxPolicy] = Field(default_factory=dict)
    quotas: tuple[QuotaOverride, ...] = ()

    @field_validator("server_requests")
    @classmethod
    def _known_requests(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for server, methods in value.items():
            for method in methods:
                if method not in SERVER_REQUEST_METHODS:
                    known = ", ".join(SERVER_REQUEST_METHODS)
                    raise ValueError(f"{server}: {method!r} is not one of {known}")
        return value
