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
      path: {pattern: "^/data/"}       # a regular expression (full match not required)
      limit: {schema: {type: integer, maximum: 100}}   # or a JSON-schema fragment
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
```
"""

from __future__ import annotations

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


class ArgumentConstraint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _exactly_one(self) -> ArgumentConstraint:
        if (self.pattern is None) == (self.schema_ is None):
            raise ValueError("give exactly one of `pattern` or `schema`")
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
        return self


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    effect: Literal["allow", "deny"]
    identities: tuple[str, ...] = Field(min_length=1)
    servers: tuple[str, ...] = Field(min_length=1)
    methods: tuple[str, ...] = Field(min_length=1)
    names: tuple[str, ...] = ("*",)
    arguments: dict[str, ArgumentConstraint] = Field(default_factory=dict)
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


class PolicyFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1]
    rules: tuple[Rule, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    server_requests: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    sandboxes: dict[str, SandboxPolicy] = Field(default_factory=dict)

    @field_validator("server_requests")
    @classmethod
    def _known_requests(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for server, methods in value.items():
            for method in methods:
                if method not in SERVER_REQUEST_METHODS:
                    known = ", ".join(SERVER_REQUEST_METHODS)
                    raise ValueError(f"{server}: {method!r} is not one of {known}")
        return value
