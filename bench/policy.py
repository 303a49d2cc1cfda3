"""Policy decision time per call on a 100-rule policy (target: <= 20 us median).

The slow case is a request admitted by the policy's last rule, with an argument regex to
check; also a request denied by default. (The evaluator only looks at the rules whose
server globs match the request's server.) Prints a Markdown table; not a test.

Run: .venv/bin/python bench/policy.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from stockade.policy.evaluator import Evaluator, Request
from stockade.policy.loader import load_policy

RULES = 100


def write_policy(folder: Path) -> Path:
    lines = ["version: 1", "rules:"]
    for n in range(RULES - 1):
        effect = "deny" if n % 4 == 0 else "allow"
        lines += [
            f"  - name: rule-{n}",
            f"    effect: {effect}",
            f'    identities: ["spiffe://stockade.local/host/team-{n}-*"]',
            f'    servers: ["server-{n}"]',
            '    methods: ["tools/call"]',
            f'    names: ["tool_{n}_*"]',
        ]
    lines += [
        "  - name: the-one",
        "    effect: allow",
        '    identities: ["spiffe://stockade.local/host/*"]',
        '    servers: ["files"]',
        '    methods: ["tools/call"]',
        '    names: ["read_*"]',
        "    arguments:",
        '      path: {pattern: "/data/.*"}',
    ]
    path = folder / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def median_us(evaluator: Evaluator, request: Request, rounds: int = 20000) -> float:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter_ns()
        evaluator.decide(request)
        samples.append(time.perf_counter_ns() - began)
    return statistics.median(samples) / 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        evaluator = Evaluator(load_policy([write_policy(Path(folder))]))
    identity = "spiffe://stockade.local/host/laptop"
    allowed = Request(identity, "files", "tools/call", "read_file", {"path": "/data/a"})
    denied = Request(identity, "time", "tools/call", "get_current_time", {})
    assert evaluator.decide(allowed).allowed and not evaluator.decide(denied).allowed
    print(f"| policy decision ({RULES} rules, median of 20,000) | time |")
    print("| --- | --- |")
    slow_allow = median_us(evaluator, allowed)
    print(f"| allowed by the last rule (argument regex checked) | {slow_allow:.1f} µs |")
    default_deny = median_us(evaluator, denied)
    print(f"| denied by default (no rule for that server) | {default_deny:.1f} µs |")


if __name__ == "__main__":
    main()
