"""CLI conventions: every command explains itself with an example, and the shell completes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from stockade.cli.commands import _parser

BIN = Path(sys.executable).parent


def leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for sub in subs:
        for name, child in sub.choices.items():
            yield from leaf_commands(child, (*path, name))


def test_every_command_has_help_with_an_example() -> None:
    commands = list(leaf_commands(_parser()))
    assert len(commands) > 25
    missing = [
        " ".join(path)
        for path, parser in commands
        if "example: stockade" not in (parser.epilog or "")
    ]
    assert missing == []


def test_the_shell_completes_commands_and_actions(tmp_path: Path) -> None:
    def complete(line: str) -> set[str]:
        out = tmp_path / "completions"
        env = os.environ | {
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        }
        subprocess.run([str(BIN / "stockade")], env=env, timeout=60, check=False)
        return {word.strip() for word in out.read_text().split("\n") if word.strip()}

    assert {"secret", "server", "session"} <= complete("stockade se")
    assert {"enroll", "config"} <= complete("stockade client ")
    assert {"claude-desktop", "claude-code"} <= complete("stockade client config cl")
