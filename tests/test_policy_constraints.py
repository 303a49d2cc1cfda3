"""Argument constraints that mean what they say (issue 14), and which files a policy is made of.

Each table row is one call under one small policy: allowed or not. Deny rules are checked
both ways: a constraint that cannot be vouched for (NUL, newline, a non-array) makes a deny
rule apply, never lets a call slip past it.
"""

from __future__ import annotations

import math
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from structlog.testing import capture_logs

from stockade.policy.evaluator import Evaluator, Request
from stockade.policy.loader import PolicyError, load_file, load_policy
from stockade.policy.store import PolicyStore

HOST = "spiffe://stockade.local/host/laptop"

POLICY = """\
version: 1
rules:
  - name: read-under-data
    effect: allow
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["read"]
    additional_arguments: false
    arguments:
      path: {path: {under: /data}}
      head: {schema: {type: integer, minimum: 0, maximum: 100}, optional: true}
  - name: read-many
    effect: allow
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["read_many"]
    additional_arguments: false
    arguments:
      paths[]: {path: {under: [/data, /srv/shared]}}
  - name: mode-by-pattern
    effect: allow
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["open"]
    arguments:
      mode: {pattern: "r|rw"}
      note: {pattern: '[a-z\\s]*', multiline: true, optional: true}
  - name: mail-by-format
    effect: allow
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["ping_host"]
    arguments:
      address: {schema: {type: string, format: ipv4}}
      weight: {schema: {type: number, maximum: 10}, optional: true}
  - name: anything-but-secrets
    effect: allow
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["stat"]
  - name: never-secrets
    effect: deny
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["stat"]
    arguments:
      path: {pattern: "/secret(/.*)?"}
  - name: never-secrets-many
    effect: deny
    identities: ["*"]
    servers: ["files"]
    methods: ["tools/call"]
    names: ["stat"]
    arguments:
      paths[]: {path: {under: /secret}}
"""


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory: pytest.TempPathFactory) -> Evaluator:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return Evaluator(load_policy([path]))


@pytest.mark.parametrize(
    ("name", "arguments", "allowed"),
    [
        # path: {under}
        ("read", {"path": "/data"}, True),
        ("read", {"path": "/data/a/b.txt"}, True),
        ("read", {"path": "/data/./a//b"}, True),
        ("read", {"path": "//data/a"}, True),
        ("read", {"path": "/data/../etc/passwd"}, False),
        ("read", {"path": "/data/a/../b"}, False),  # '..' is resolved through symlinks
        ("read", {"path": "/database"}, False),
        ("read", {"path": "data/a"}, False),
        ("read", {"path": "/data\n"}, False),
        ("read", {"path": "/data/a\x00.txt"}, False),
        ("read", {"path": "/data/a\u2028"}, False),
        ("read", {"path": ["/data/a"]}, False),
        ("read", {}, False),
        # optional, and arguments the rule does not name
        ("read", {"path": "/data/a", "head": 5}, True),
        ("read", {"path": "/data/a", "head": 500}, False),
        ("read", {"path": "/data/a", "head": math.nan}, False),
        ("read", {"path": "/data/a", "paths": ["/etc/passwd"]}, False),
        ("read", {"path": "/data/a", "PATH": "/etc/passwd"}, False),
        ("read", {"Path": "/etc/passwd", "path": "/data/a"}, False),
        # name[]: every element
        ("read_many", {"paths": ["/data/a", "/srv/shared/b"]}, True),
        ("read_many", {"paths": []}, True),
        ("read_many", {"paths": ["/data/a", "/etc/passwd"]}, False),
        ("read_many", {"paths": "/data/a"}, False),
        ("read_many", {"paths": ["/data/a", 3]}, False),
        ("read_many", {"paths": ["/etc/passwd"], "path": "/data"}, False),  # the decoy
        # pattern: a full match, no control characters unless multiline
        ("open", {"mode": "r"}, True),
        ("open", {"mode": "rw"}, True),
        ("open", {"mode": "rwx"}, False),  # re.match would have accepted this prefix
        ("open", {"mode": "r\n"}, False),  # `$` would have accepted this
        ("open", {"mode": "r", "note": "two\nlines"}, True),
        ("open", {"mode": "r", "note": "nul\x00"}, False),
        ("open", {"mode": "r", "extra": 1}, True),  # additional arguments allowed by default
        # schema: format checked, non-finite refused
        ("ping_host", {"address": "10.0.0.1"}, True),
        ("ping_host", {"address": "10.0.0.300"}, False),
        ("ping_host", {"address": "10.0.0.1", "weight": 3.5}, True),
        ("ping_host", {"address": "10.0.0.1", "weight": math.nan}, False),
        ("ping_host", {"address": "10.0.0.1", "weight": -math.inf}, False),
        # deny rules: apply when the constraint holds or cannot be vouched for
        ("stat", {"path": "/data/a"}, True),
        ("stat", {"path": "/secret"}, False),
        ("stat", {"path": "/secret/key"}, False),
        ("stat", {"path": "/secretary"}, True),  # a full match: not under /secret
        ("stat", {"path": "/secret\n"}, False),  # unclear: the deny applies
        ("stat", {"path": 7}, False),
        ("stat", {"PATH": "/secret/key"}, False),  # a look-alike of a denied argument
        ("stat", {"paths": ["/data/a", "/secret/b"]}, False),  # any element
        ("stat", {"paths": ["/data/a", "/data/b"]}, True),
        ("stat", {"paths": "/secret/b"}, False),  # not an array: unclear
        ("stat", {"paths": ["/data/../secret/b"]}, False),
    ],
)
def test_constraints(evaluator: Evaluator, name: str, arguments: Any, allowed: bool) -> None:
    decision = evaluator.decide(Request(HOST, "files", "tools/call", name, arguments))
    assert decision.allowed is allowed, decision.reason


def test_reasons_never_show_argument_values(evaluator: Evaluator) -> None:
    cases = [
        ("read", {"path": "/etc/shadow-VALUE"}),
        ("read", {"path": "/data/a", "head": 987654}),
        ("read_many", {"paths": ["/data/a", "/etc/shadow-VALUE"]}),
        ("ping_host", {"address": "VALUE"}),
        ("open", {"mode": "VALUE"}),
    ]
    for name, arguments in cases:
        reason = evaluator.decide(Request(HOST, "files", "tools/call", name, arguments)).reason
        assert "VALUE" not in reason and "987654" not in reason, reason
        assert "rule" in reason


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("p: {path: {under: data}}", "absolute paths"),
        ("p: {path: {under: /data/../etc}}", "without '..'"),
        ("p: {pattern: x, path: {under: /d}}", "exactly one of"),
        ("p: {schema: {type: string}, multiline: true}", "`multiline` applies to `pattern`"),
        ("p: {schema: {type: string, format: uri}}", "format uri cannot be checked"),
        ("p: {pattern: x}\n      p[]: {pattern: y}", "constrained twice"),
        ("'[]': {pattern: x}", "an argument name"),
    ],
)
def test_bad_constraints_name_file_and_line(tmp_path: Path, arguments: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "version: 1\nrules:\n  - name: a\n    effect: allow\n    identities: [x]\n"
        "    servers: [s]\n    methods: [tools/call]\n    arguments:\n      " + arguments + "\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_file(path)
    assert str(caught.value).startswith(f"{path}:")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    additional_arguments: false\n", "additional_arguments applies to allow rules"),
        ("    arguments:\n      p: {pattern: x, optional: true}\n", "`optional` applies"),
    ],
)
def test_allow_only_options_refused_on_deny_rules(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "deny.yaml"
    path.write_text(
        "version: 1\nrules:\n  - name: a\n    effect: deny\n    identities: [x]\n"
        "    servers: [s]\n    methods: [tools/call]\n" + extra
    )
    with pytest.raises(PolicyError) as caught:
        load_file(path)
    assert message in str(caught.value)


RULE = """\
version: 1
rules:
  - name: {name}
    effect: allow
    identities: ["*"]
    servers: ["time"]
    methods: ["tools/call"]
"""


def test_yml_files_load_and_other_files_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(RULE.format(name="from-yaml"))
    (tmp_path / "b.yml").write_text(RULE.format(name="from-yml"))
    (tmp_path / "c.yaml.bak").write_text(RULE.format(name="from-backup"))
    (tmp_path / "README").write_text("notes")
    policy = load_policy([tmp_path])
    assert [rule.name for rule in policy.rules] == ["from-yaml", "from-yml"]
    assert sorted(Path(p).name for p in policy.ignored) == ["README", "c.yaml.bak"]
    with capture_logs() as logged:
        store = PolicyStore(tmp_path)
    assert sorted(Path(p).name for p in store.ignored) == ["README", "c.yaml.bak"]
    reported = sorted(Path(e["path"]).name for e in logged if "not a policy file" in e["event"])
    assert reported == ["README", "c.yaml.bak"]


def test_a_yml_file_change_triggers_a_reload(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text(RULE.format(name="first"))
    store = PolicyStore(tmp_path)
    assert [rule.name for rule in store.evaluator.policy.rules] == ["first"]
    (tmp_path / "a.yml").write_text(RULE.format(name="second-and-longer"))
    assert store.reload_if_changed()
    assert [rule.name for rule in store.evaluator.policy.rules] == ["second-and-longer"]


def test_a_folder_with_only_other_files_denies_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text("{}")
    with capture_logs() as logged:
        store = PolicyStore(tmp_path)
    assert store.evaluator.policy.rules == ()
    events = [e["event"] for e in logged]
    assert any("not a policy file" in e for e in events)
    assert any("every request is denied" in e for e in events)


def test_the_shipped_filesystem_policy_reads_like_its_header() -> None:
    root = Path(__file__).resolve().parents[1]
    text = (root / "policies" / "filesystem.yaml").read_text()
    assert "additional_arguments: false" in dedent(text)
    evaluator = Evaluator(load_policy([root / "policies" / "filesystem.yaml"]))
    decoy = {"paths": ["/etc/passwd"], "path": "/data"}
    request = Request(HOST, "filesystem", "tools/call", "read_multiple_files", decoy)
    assert not evaluator.decide(request).allowed
    allowed = Request(HOST, "filesystem", "tools/call", "list_allowed_directories", {})
    assert evaluator.decide(allowed).allowed


def test_a_look_alike_member_nested_in_a_schema_argument_is_never_allowed(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrules:\n  - name: read-mode\n    effect: allow\n"
        '    identities: ["*"]\n    servers: ["s"]\n    methods: ["tools/call"]\n'
        "    arguments:\n      options: {schema: {type: object, properties: "
        "{mode: {enum: [read]}}}}\n"
    )
    evaluator = Evaluator(load_policy([tmp_path]))

    def allowed(arguments: dict[str, object]) -> bool:
        return evaluator.decide(
            Request("spiffe://x/host/a", "s", "tools/call", "t", arguments)
        ).allowed

    assert allowed({"options": {"mode": "read"}})
    assert not allowed({"options": {"mode": "write"}})
    for spelled in ("MODE", "Mode", "mOdE"):  # a Go struct's Mode field takes each of them
        assert not allowed({"options": {spelled: "write"}}), spelled
