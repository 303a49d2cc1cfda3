"""Load policy files; every error names the file, the line and the field.

YAML is parsed into nodes first (they carry line numbers), converted to plain data while
remembering which path came from which line, then validated with pydantic. A pydantic error
location is mapped back to the closest line. A directory's `*.yaml` and `*.yml` files are one
policy; anything else in it is not loaded and is listed in `Policy.ignored`, so that whoever
loads the policy says so (a policy file saved under another name must not vanish silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stockade.policy.model import PolicyFile, QuotaOverride, RateLimit, Rule
from stockade.policy.sandbox import DEFAULT_SANDBOX, SandboxPolicy

PathKey = tuple[str | int, ...]


class PolicyError(Exception):
    """A policy file is invalid: `file:line: field: problem`."""


@dataclass(frozen=True)
class Policy:
    """Every rule of every file, in file order, and the server requests allowed."""

    rules: tuple[Rule, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    server_requests: dict[str, frozenset[str]] = field(default_factory=dict)
    sandboxes: dict[str, SandboxPolicy] = field(default_factory=dict)
    quotas: tuple[QuotaOverride, ...] = ()
    files: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # entries of a policy directory that are not policy files

    def sandbox(self, server: str) -> SandboxPolicy:
        """The server's sandbox policy; the hardened default when no file names it."""
        return self.sandboxes.get(server, DEFAULT_SANDBOX)


def _to_data(node: yaml.Node, path: PathKey, lines: dict[PathKey, int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in result:
                raise PolicyError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            result[key] = _to_data(value_node, (*path, key), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(item, (*path, index), lines) for index, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))  # a scalar, typed as safe_load would type it


def _line_of(loc: PathKey, lines: dict[PathKey, int]) -> int:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def load_file(path: Path) -> PolicyFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise PolicyError(f"{path}:{line}: YAML syntax: {exc.problem}") from None
    if node is None:
        raise PolicyError(f"{path}:1: the file is empty (write `version: 1` and rules)")
    lines: dict[PathKey, int] = {}
    try:
        data = _to_data(node, (), lines)
    except PolicyError as exc:
        raise PolicyError(f"{path}:{str(exc)[len('line ') :]}") from None
    try:
        parsed = PolicyFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc: PathKey = tuple(first["loc"])
        where = ".".join(str(p) for p in loc) or "(file)"
        message = first["msg"].removeprefix("Value error, ")
        raise PolicyError(f"{path}:{_line_of(loc, lines)}: {where}: {message}") from None
    rules = tuple(
        rule.model_copy(update={"source": f"{path}:{lines.get(('rules', index), 1)}"})
        for index, rule in enumerate(parsed.rules)
    )
    sandboxes = {
        server: sandbox.model_copy(
            update={"source": f"{path}:{lines.get(('sandboxes', server), 1)}"}
        )
        for server, sandbox in parsed.sandboxes.items()
    }
    quotas = tuple(
        quota.model_copy(update={"source": f"{path}:{lines.get(('quotas', index), 1)}"})
        for index, quota in enumerate(parsed.quotas)
    )
    return parsed.model_copy(update={"rules": rules, "sandboxes": sandboxes, "quotas": quotas})


POLICY_SUFFIXES = (".yaml", ".yml")


def policy_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """A policy directory's policy files (*.yaml, *.yml), and its other entries; sorted."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise PolicyError(f"{directory}: {exc.strerror}") from None
    files = [p for p in entries if p.suffix in POLICY_SUFFIXES and p.is_file()]
    return files, [p for p in entries if p not in files]


def load_policy(paths: list[Path]) -> Policy:
    """Load files and directories (their *.yaml and *.yml, sorted) into one policy."""
    files: list[Path] = []
    ignored: list[Path] = []
    for path in paths:
        if path.is_dir():
            found, others = policy_files(path)
            files.extend(found)
            ignored.extend(others)
        elif path.exists():
            files.append(path)
        else:
            raise PolicyError(f"{path}: no such file or directory")
    rules: list[Rule] = []
    limits: list[RateLimit] = []
    requests: dict[str, set[str]] = {}
    sandboxes: dict[str, SandboxPolicy] = {}
    quotas: list[QuotaOverride] = []
    for path in files:
        loaded = load_file(path)
        rules.extend(loaded.rules)
        quotas.extend(loaded.quotas)
        limits.extend(loaded.rate_limits)
        for server, methods in loaded.server_requests.items():
            requests.setdefault(server, set()).update(methods)
        for server, sandbox in loaded.sandboxes.items():
            if server in sandboxes:
                raise PolicyError(
                    f"{sandbox.source}: sandboxes.{server}: already defined at "
                    f"{sandboxes[server].source} (one sandbox per server)"
                )
            sandboxes[server] = sandbox
    names = [rule.name for rule in rules] + [limit.name for limit in limits]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PolicyError(
            f"rule and limit names must be unique across files: {', '.join(duplicates)}"
        )
    return Policy(
        rules=tuple(rules),
        rate_limits=tuple(limits),
        server_requests={s: frozenset(m) for s, m in requests.items()},
        sandboxes=sandboxes,
        quotas=tuple(quotas),
        files=tuple(str(f) for f in files),
        ignored=tuple(str(f) for f in ignored),
    )
