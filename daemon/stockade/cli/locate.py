"""Where the CLI finds its client certificate, with nothing heavy imported (the bridge uses it).

`--cert/--key/--ca` if given; else the first folder holding client.crt, client.key and
ca.crt among two places, in an order that depends on the command: `stockade connect` (a
host) looks in `$XDG_CONFIG_HOME/stockade` first, where a host's certificate is written; the
operator's commands look first in the daemon owner's admin folder in the state dir, so that
a host certificate in the same account never shadows it.
"""

from __future__ import annotations

import os
from pathlib import Path

CREDENTIAL_FILES = ("client.crt", "client.key", "ca.crt")


def credential_args(folder: Path) -> list[str]:
    """`--cert/--key/--ca` for the credentials in `folder` (as `cert issue --out` writes them)."""
    return [
        "--cert",
        str(folder / "client.crt"),
        "--key",
        str(folder / "client.key"),
        "--ca",
        str(folder / "ca.crt"),
    ]


def user_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "stockade"


def credential_folder(state_dir: Path, as_host: bool) -> Path | None:
    """The first folder with all three credential files, in the command's order."""
    places = [user_config_dir(), state_dir / "pki" / "admin"]
    if not as_host:
        places.reverse()
    return next(
        (
            candidate
            for candidate in places
            if all(os.access(candidate / name, os.R_OK) for name in CREDENTIAL_FILES)
        ),
        None,
    )


def no_credentials_message() -> str:
    return (
        f"no client certificate found in {user_config_dir()}; ask an admin for one "
        "(`stockade cert issue --identity NAME`) or pass --cert/--key/--ca"
    )
