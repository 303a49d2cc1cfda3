"""Argument constraints, compiled: does one argument of a call satisfy its constraint?

A check answers HOLDS, FAILS, or UNCLEAR. UNCLEAR is a value the check cannot vouch for: a
string with NUL or a line break, a relative path or one with a `..` segment, a non-array
where `name[]` wants an array, a non-finite number, a value of the wrong type. An allow rule
needs HOLDS; a deny rule applies on HOLDS or UNCLEAR. Either way an unclear value is refused,
so a hostile caller gains nothing by making a value hard to read.

- `pattern`: `re.fullmatch`; never holds for a string with a control character (NUL, a line
  break...), except that `multiline: true` lets line breaks and tabs through.
- `path: {under: [...]}`: an absolute path, `.` and repeated `/` resolved, `..` refused (the
  kernel resolves `..` through symlinks, which a lexical check cannot see), then compared by
  whole segments: `/data` and `/data/x` are under `/data`, `/database` is not.
- `schema`: a JSON-schema fragment (draft 2020-12) with the format checker.
- `name[]`: the argument is an array; an allow rule needs every element to hold, a deny rule
  applies when any element holds (or is unclear), or when the value is not an array.

Reasons never contain argument values: they name the constraint and what kind of problem.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from jsonschema import Draft202012Validator

from stockade.policy.model import ArgumentConstraint
from stockade.wire.strict_json import fold_key

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]")


class Verdict(Enum):
    HOLDS = "holds"
    FAILS = "fails"
    UNCLEAR = "unclear"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    why: str = ""  # for FAILS and UNCLEAR; never the value itself


HOLDS = Outcome(Verdict.HOLDS)
Check = Callable[[Any], Outcome]


def _pattern(constraint: ArgumentConstraint) -> Check:
    assert constraint.pattern is not None  # noqa: S101 - the caller picked this kind
    regex = re.compile(constraint.pattern)
    controls = _CONTROL_MULTILINE if constraint.multiline else _CONTROL
    fails = Outcome(Verdict.FAILS, f"does not match {constraint.pattern!r}")

    def check(value: Any) -> Outcome:
        if not isinstance(value, str):
            return Outcome(Verdict.UNCLEAR, "must be a string")
        if controls.search(value) is not None:
            return Outcome(Verdict.UNCLEAR, "holds a control character or line break")
        return HOLDS if regex.fullmatch(value) else fails

    return check


def _path(constraint: ArgumentConstraint) -> Check:
    assert constraint.path is not None  # noqa: S101 - the caller picked this kind
    roots = constraint.path.under
    prefixes = tuple(root if root == "/" else root + "/" for root in roots)
    fails = Outcome(Verdict.FAILS, f"is not under {', '.join(roots)}")

    def check(value: Any) -> Outcome:
        if not isinstance(value, str):
            return Outcome(Verdict.UNCLEAR, "must be a string (a path)")
        if _CONTROL.search(value) is not None:
            return Outcome(Verdict.UNCLEAR, "holds a control character or line break")
        if not value.startswith("/"):
            return Outcome(Verdict.UNCLEAR, "must be an absolute path")
        if ".." in value.split("/"):
            return Outcome(Verdict.UNCLEAR, "holds a '..' segment")
        normal = posixpath.normpath("/" + value.lstrip("/"))
        if normal in roots or normal.startswith(prefixes):
            return HOLDS
        return fails

    return check


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _look_alike_member(schema: Any, value: Any, depth: int = 0) -> str | None:
    """A member of `value` (at any depth the schema describes) spelled like one of the
    schema's `properties` but not exactly: "MODE" beside a constrained "mode"."""
    if depth > 64 or not isinstance(schema, dict):
        return None
    properties = schema.get("properties")
    if isinstance(value, dict) and isinstance(properties, dict):
        folded = {fold_key(name): name for name in properties}
        for key, item in value.items():
            if key not in properties and fold_key(key) in folded:
                return f"{key[:40]!r}"
            found = _look_alike_member(properties.get(key), item, depth + 1)
            if found is not None:
                return found
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, dict):
        for item in value:
            found = _look_alike_member(items, item, depth + 1)
            if found is not None:
                return found
    return None


def _schema(constraint: ArgumentConstraint) -> Check:
    validator = Draft202012Validator(
        constraint.schema_ or {}, format_checker=Draft202012Validator.FORMAT_CHECKER
    )

    def check(value: Any) -> Outcome:
        if not _finite(value):
            return Outcome(Verdict.UNCLEAR, "holds a non-finite number")
        alike = _look_alike_member(constraint.schema_ or {}, value)
        if alike is not None:  # a Go struct's field would take it, unchecked by the schema
            return Outcome(Verdict.UNCLEAR, f"holds {alike}, spelled like a constrained member")
        error = next(iter(validator.iter_errors(value)), None)
        if error is None:
            return HOLDS
        where = "/".join(str(p) for p in error.absolute_path)
        return Outcome(
            Verdict.FAILS,
            f"fails the schema's {error.validator!r}" + (f" at /{where}" if where else ""),
        )

    return check


@dataclass(frozen=True)
class CompiledArgument:
    """One `arguments:` entry of a rule."""

    name: str  # the argument's name (without [])
    each: bool  # written `name[]`: an array, checked element by element
    optional: bool
    check: Check

    @classmethod
    def of(cls, key: str, constraint: ArgumentConstraint) -> CompiledArgument:
        if constraint.pattern is not None:
            check = _pattern(constraint)
        elif constraint.path is not None:
            check = _path(constraint)
        else:
            check = _schema(constraint)
        name = key.removesuffix("[]")
        return cls(name, name != key, constraint.optional, check)

    def for_allow(self, value: Any) -> Outcome:
        """HOLDS only when the value (every element, for name[]) holds."""
        if not self.each:
            return self.check(value)
        if not isinstance(value, list):
            return Outcome(Verdict.UNCLEAR, "must be an array")
        for index, element in enumerate(value):
            outcome = self.check(element)
            if outcome.verdict is not Verdict.HOLDS:
                return Outcome(outcome.verdict, f"element {index} {outcome.why}")
        return HOLDS

    def for_deny(self, value: Any) -> bool:
        """Whether a deny rule's constraint applies: it holds, or cannot be vouched for."""
        if not self.each:
            return self.check(value).verdict is not Verdict.FAILS
        if not isinstance(value, list):
            return True
        return any(self.check(element).verdict is not Verdict.FAILS for element in value)


def shown(name: str) -> str:
    """A caller-chosen argument name for a reason: escaped and bounded."""
    text = json.dumps(name[:40], ensure_ascii=True)
    return text if len(name) <= 40 else text[:-1] + '..."'
