"""`stockade policy lint|check|show`: read and test access policies, offline.

These read the policy files themselves and start nothing: an operator can check a change
before the daemon loads it. `check` exits 0 for allow and REFUSED for deny, so scripts can
test a policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stockade import exitcodes
from stockade.cli.channel import CliError
from stockade.cli.terminal import printable
from stockade.config import SettingsError, load_settings


def _policy_paths(args: argparse.Namespace) -> list[Path]:
    if args.policies:
        return list(args.policies)
    try:
        return [load_settings().policy_dir]
    except SettingsError as exc:
        raise CliError(str(exc), exitcodes.CONFIG) from None


def _load_policy(paths: list[Path]) -> Any:
    from stockade.policy.loader import PolicyError, load_policy  # noqa: PLC0415

    try:
        policy = load_policy(paths)
    except PolicyError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    for name in policy.ignored:
        print(
            f"stockade: {printable(name)}: not a policy file (*.yaml, *.yml); ignored",
            file=sys.stderr,
        )
    return policy


def cmd_policy_lint(args: argparse.Namespace) -> int:
    from stockade.policy.loader import PolicyError, load_file  # noqa: PLC0415

    failed = False
    for path in args.files:
        try:
            loaded = load_file(path)
        except PolicyError as exc:
            print(f"stockade: {printable(exc)}", file=sys.stderr)
            failed = True
            continue
        print(f"{path}: ok ({len(loaded.rules)} rules)")
    return exitcodes.USAGE if failed else exitcodes.OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    from stockade.pki.identity import Identity, IdentityError  # noqa: PLC0415
    from stockade.policy.evaluator import Evaluator, Request  # noqa: PLC0415

    identity = args.identity
    if not identity.startswith("spiffe://"):
        role, _, name = identity.partition("/")
        try:
            identity = Identity.make(role, name).uri
        except IdentityError as exc:
            raise CliError(
                f"--identity: {exc} (e.g. host/claude-desktop)", exitcodes.USAGE
            ) from None
    try:
        arguments = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"--args is not JSON: {exc}", exitcodes.USAGE) from None
    if not isinstance(arguments, dict):
        raise CliError("--args must be a JSON object", exitcodes.USAGE)
    evaluator = Evaluator(_load_policy(_policy_paths(args)))
    decision = evaluator.decide(Request(identity, args.server, args.method, args.name, arguments))
    if args.json:
        print(
            json.dumps(
                {
                    "allowed": decision.allowed,
                    "rule": decision.rule,
                    "source": decision.source,
                    "reason": decision.reason,
                }
            )
        )
    else:
        print("ALLOW" if decision.allowed else "DENY")
        print(
            f"  rule:   {decision.rule or '(default deny)'}"
            + (f"  [{decision.source}]" if decision.source else "")
        )
        print(f"  reason: {decision.reason}")
    return exitcodes.OK if decision.allowed else exitcodes.REFUSED


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = _load_policy(_policy_paths(args))
    shown = {
        "files": list(policy.files),
        "ignored": list(policy.ignored),
        "combining": "deny overrides; allow needs a matching rule; default deny",
        "rules": [
            {"source": r.source, **r.model_dump(mode="json", by_alias=True, exclude_defaults=False)}
            for r in policy.rules
        ],
        "server_requests": {s: sorted(m) for s, m in policy.server_requests.items()},
        "sandboxes": {
            server: {"source": sandbox.source, **sandbox.model_dump(mode="json")}
            for server, sandbox in sorted(policy.sandboxes.items())
        },
        "sandbox_default": "hardened defaults and no network for any server not listed",
    }
    print(json.dumps(shown, indent=None if args.json else 2))
    return exitcodes.OK


def add_policy_parsers(sub: Any) -> None:
    policy = sub.add_parser("policy", help="read and test access policies (offline)")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    lint = actions.add_parser(
        "lint",
        help="validate policy files; errors name file and line",
        epilog="example: stockade policy lint policies/*.yaml",
    )
    lint.add_argument("files", nargs="+", type=Path, metavar="FILE")
    lint.set_defaults(handler=cmd_policy_lint)

    check = actions.add_parser(
        "check",
        help="would this request be allowed, by which rule, and why",
        epilog="example: stockade policy check --policies policies --identity host/laptop "
        '--server time --method tools/call --name get_current_time --args \'{"timezone":"UTC"}\'',
    )
    check.add_argument("--identity", required=True, help="host/NAME, admin/NAME or a spiffe:// URI")
    check.add_argument("--server", required=True)
    check.add_argument("--method", required=True, help="e.g. tools/call, resources/read")
    check.add_argument("--name", help="tool or prompt name, or resource URI")
    check.add_argument("--args", help="the call's arguments as a JSON object")
    check.add_argument(
        "--policies",
        type=Path,
        nargs="+",
        help="policy files or folders (default: the policy_dir setting)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_policy_check)

    show = actions.add_parser(
        "show",
        help="the effective policy: every rule, in order",
        epilog="example: stockade policy show --policies policies",
    )
    show.add_argument(
        "--policies",
        type=Path,
        nargs="+",
        help="policy files or folders (default: the policy_dir setting)",
    )
    show.add_argument("--json", action="store_true", help="one line of JSON")
    show.set_defaults(handler=cmd_policy_show)
