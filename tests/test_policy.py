"""Policy files and decisions: tables of requests, and errors that name file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from stockade.policy.evaluator import Evaluator, Request
from stockade.policy.loader import PolicyError, load_file, load_policy

ROOT = Path(__file__).resolve().parents[1]
HOST = "spiffe://stockade.local/host/laptop"
OTHER = "spiffe://stockade.local/host/phone"
ADMIN = "spiffe://stockade.local/admin/ops"

POLICY = """\
version: 1
rules:
  - name: laptop-reads-data
    effect: allow
    identities: ["spiffe://stockade.local/host/laptop"]
    servers: ["files-*"]
    methods: ["tools/call", "resources/read"]
    names: ["read_*", "file:///data/*"]
    arguments:
      path: {pattern: "/data/.*"}
  - name: anyone-lists-limited
    effect: allow
    identities: ["spiffe://stockade.local/host/*"]
    servers: ["files-main"]
    methods: ["tools/call"]
    names: ["list_directory"]
    arguments:
      depth: {schema: {type: integer, minimum: 0, maximum: 3}}
  - name: nobody-reads-secrets
    effect: deny
    identities: ["*"]
    servers: ["*"]
    methods: ["tools/call"]
    names: ["read_*"]
    arguments:
      path: {pattern: ".*secret.*"}
  - name: phone-is-blocked
    effect: deny
    identities: ["spiffe://stockade.local/host/phone"]
    servers: ["*"]
    methods: ["*"]
server_requests:
  files-main: ["roots/list"]
"""


@pytest.fixture
def evaluator(tmp_path: Path) -> Evaluator:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return Evaluator(load_policy([path]))


@pytest.mark.parametrize(
    ("identity", "server", "method", "name", "arguments", "allowed", "rule"),
    [
        # allow with a glob over servers and names, and an argument regex
        (
            HOST,
            "files-main",
            "tools/call",
            "read_file",
            {"path": "/data/a.txt"},
            True,
            "laptop-reads-data",
        ),
        (
            HOST,
            "files-backup",
            "tools/call",
            "read_text",
            {"path": "/data/b"},
            True,
            "laptop-reads-data",
        ),
        # the argument outside its constraint: refused, naming the rule
        (
            HOST,
            "files-main",
            "tools/call",
            "read_file",
            {"path": "/etc/passwd"},
            False,
            "laptop-reads-data",
        ),
        (HOST, "files-main", "tools/call", "read_file", {}, False, "laptop-reads-data"),
        # deny overrides: a matching deny beats the allow
        (
            HOST,
            "files-main",
            "tools/call",
            "read_file",
            {"path": "/data/secret.txt"},
            False,
            "nobody-reads-secrets",
        ),
        # JSON-schema fragment
        (
            OTHER.replace("phone", "tablet"),
            "files-main",
            "tools/call",
            "list_directory",
            {"depth": 2},
            True,
            "anyone-lists-limited",
        ),
        (
            HOST,
            "files-main",
            "tools/call",
            "list_directory",
            {"depth": 9},
            False,
            "anyone-lists-limited",
        ),
        (
            HOST,
            "files-main",
            "tools/call",
            "list_directory",
            {"depth": "2"},
            False,
            "anyone-lists-limited",
        ),
        # resources by URI glob: the rule's `path` constraint applies to every method it lists
        (
            HOST,
            "files-main",
            "resources/read",
            "file:///data/x",
            {"path": "/data/x"},
            True,
            "laptop-reads-data",
        ),
        (HOST, "files-main", "resources/read", "file:///data/x", {}, False, "laptop-reads-data"),
        (HOST, "files-main", "resources/read", "file:///etc/x", {}, False, None),
        # default deny: unknown tool, unknown server, other method, other identity
        (HOST, "files-main", "tools/call", "write_file", {"path": "/data/a"}, False, None),
        (HOST, "time", "tools/call", "read_file", {"path": "/data/a"}, False, None),
        (HOST, "files-main", "prompts/get", "read_me", {}, False, None),
        (ADMIN, "files-main", "tools/call", "read_file", {"path": "/data/a"}, False, None),
        # session methods follow "may use this server at all"
        (HOST, "files-main", "initialize", None, {}, True, "laptop-reads-data"),
        (HOST, "files-main", "tools/list", None, {}, True, "laptop-reads-data"),
        (ADMIN, "files-main", "initialize", None, {}, False, None),
        (HOST, "time", "tools/list", None, {}, False, None),
        # an identity-wide deny covers session methods too
        (OTHER, "files-main", "initialize", None, {}, False, "phone-is-blocked"),
        (
            OTHER,
            "files-main",
            "tools/call",
            "list_directory",
            {"depth": 1},
            False,
            "phone-is-blocked",
        ),
    ],
)
def test_decisions(
    evaluator: Evaluator,
    identity: str,
    server: str,
    method: str,
    name: str | None,
    arguments: dict[str, object],
    allowed: bool,
    rule: str | None,
) -> None:
    decision = evaluator.decide(Request(identity, server, method, name, arguments))
    assert decision.allowed is allowed, decision.reason
    assert decision.rule == rule
    if rule:
        assert rule in decision.reason
        assert decision.source and decision.source.endswith(
            ".yaml:" + str(POLICY.splitlines().index(f"  - name: {rule}") + 1)
        )


def test_list_answers_show_only_what_the_caller_may_use(evaluator: Evaluator) -> None:
    assert evaluator.may_see(HOST, "files-main", "tools/call", "read_file")
    assert evaluator.may_see(HOST, "files-main", "tools/call", "list_directory")
    assert not evaluator.may_see(HOST, "files-main", "tools/call", "write_file")
    assert not evaluator.may_see(OTHER, "files-main", "tools/call", "list_directory")


def test_server_requests_are_denied_unless_listed(evaluator: Evaluator) -> None:
    assert evaluator.server_request("files-main", "roots/list").allowed
    assert not evaluator.server_request("files-main", "sampling/createMessage").allowed
    assert not evaluator.server_request("time", "roots/list").allowed


def test_an_empty_policy_denies_everything(tmp_path: Path) -> None:
    evaluator = Evaluator(load_policy([ROOT / "policies" / "default.yaml"]))
    for method in ("initialize", "tools/list", "tools/call", "resources/read"):
        assert not evaluator.decide(Request(HOST, "time", method, "x")).allowed


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "version: 1\nrules:\n  - name: a\n    effect: allow\n    identities: [x]\n"
            "    servers: [s]\n    methods: [tools/call]\n    nmaes: [x]\n",
            8,
            "rules.0.nmaes: Extra inputs are not permitted",
        ),
        ("version: 1\nrules:\n  - name: a\n    effect: perhaps\n", 4, "rules.0.effect"),
        (
            "version: 1\nrules:\n  - name: a\n    effect: allow\n    identities: [x]\n"
            "    servers: [s]\n    methods: [tools/call]\n    arguments:\n"
            "      path: {pattern: '(unclosed'}\n",
            9,
            "invalid regular expression",
        ),
        (
            "version: 1\nrules:\n  - name: a\n    effect: allow\n    identities: [x]\n"
            "    servers: [s]\n    methods: [tools/call]\n    arguments:\n"
            "      n: {schema: {type: nonsense}}\n",
            9,
            "invalid JSON schema",
        ),
        ("version: 1\nrules: [\n  {name: a\n", 4, "YAML syntax"),
        ("version: 2\n", 1, "version"),
        ("version: 1\nversion: 1\n", 2, "duplicate key 'version'"),
        (
            "version: 1\nserver_requests:\n  everything: [tools/call]\n",
            3,
            "'tools/call' is not one of",
        ),
    ],
)
def test_broken_files_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_file(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


def test_the_shipped_example_policies_are_valid() -> None:
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} needs a comment header saying what it allows"
        load_file(path)


def stockade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "stockade"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_filesystem(tool: str, path: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`stockade policy check` for host/laptop calling `tool` on the example filesystem policy."""
    return stockade(
        "policy",
        "check",
        "--policies",
        str(ROOT / "policies"),
        "--identity",
        "host/laptop",
        "--server",
        "filesystem",
        "--method",
        "tools/call",
        "--name",
        tool,
        "--args",
        json.dumps({"path": path}),
        *extra,
    )


def test_cli_check_explains_without_starting_anything() -> None:
    allowed = check_filesystem("read_text_file", "/data/notes.md", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["rule"] == "filesystem-read-under-data"
    denied = check_filesystem("write_file", "/data/x")
    assert denied.returncode == 2
    assert denied.stdout.splitlines()[0] == "DENY"
    assert "filesystem-never-write" in denied.stdout
    assert "filesystem.yaml:" in denied.stdout


def test_cli_lint_reports_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        dedent("""\
        version: 1
        rules:
          - name: a
            effect: allow
            identities: []
            servers: [s]
            methods: [tools/call]
        """)
    )
    result = stockade("policy", "lint", str(ROOT / "policies" / "time.yaml"), str(broken))
    assert result.returncode == 1
    assert "time.yaml: ok (1 rules)" in result.stdout
    assert f"{broken}:5: rules.0.identities" in result.stderr


def test_cli_show_prints_rules_and_sandboxes() -> None:
    shown = stockade("policy", "show", "--policies", str(ROOT / "policies"), "--json")
    assert shown.returncode == 0, shown.stderr
    effective = json.loads(shown.stdout)
    assert {r["name"] for r in effective["rules"]} >= {"hosts-use-time", "ci-reads-github"}
    github = effective["sandboxes"]["github"]
    assert github["network"]["egress"] == ["api.github.com:443"]
    assert github["source"].endswith("github.yaml:15")
    assert effective["sandboxes"]["filesystem"]["mounts"][0]["rw"] is False
