"""The `stockade` console entry point: `connect` without the rest of the CLI.

A host launches `stockade connect` once per session, so it must start fast and small: it is
dispatched to `cli/bridge.py`, which imports only the standard library and a few small
modules of ours (no grpc, pydantic, structlog, cryptography or docker; a test checks). Every
other command, and shell completion, loads the full CLI (`cli/commands.py`).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["connect"] and "_ARGCOMPLETE" not in os.environ:
        from stockade.cli.bridge import main as connect  # noqa: PLC0415 - the light path

        return connect(words[1:])
    from stockade.cli.commands import main as full  # noqa: PLC0415 - everything else

    return full(words)


if __name__ == "__main__":
    sys.exit(main())
