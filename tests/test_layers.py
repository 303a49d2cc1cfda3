"""The package layering holds: no package imports one above it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import stockade

PACKAGE = Path(stockade.__file__).parent
# package -> packages it must never import (those above it)
FORBIDDEN = {
    "wire": {"sandbox", "relay", "supervisor", "api", "http", "cli", "daemon"},
    "sandbox": {"relay", "supervisor", "api", "http", "cli", "daemon"},
    "relay": {"supervisor", "api", "http", "cli", "daemon"},
    "supervisor": {"api", "http", "cli", "daemon"},
    "policy": {"relay", "supervisor", "api", "http", "cli", "daemon"},
    "audit": {"relay", "supervisor", "api", "http", "cli", "daemon"},
    "secrets": {"relay", "supervisor", "api", "http", "cli", "daemon"},
    "pki": {"relay", "supervisor", "api", "http", "cli", "daemon"},
    "api": {"http", "cli", "daemon"},
    "http": {"api", "cli", "daemon"},
}


def imported_packages(path: Path) -> set[str]:
    """First-level stockade packages a module imports (stockade.X...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "stockade" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_package_imports_a_layer_above_it() -> None:
    upward = []
    for package, above in FORBIDDEN.items():
        for module in sorted((PACKAGE / package).rglob("*.py")):
            for target in sorted(imported_packages(module) & above):
                upward.append(f"{module.relative_to(PACKAGE)} imports stockade.{target}")
    assert upward == []


def test_the_layer_check_sees_imports() -> None:
    # Control: the check finds what a module really imports, so an empty list above means
    # something. relay/opening.py uses the registry and the sandbox.
    found = imported_packages(PACKAGE / "relay" / "opening.py")
    assert {"registry", "sandbox", "audit"} <= found
