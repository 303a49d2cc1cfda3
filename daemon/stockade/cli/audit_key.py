"""Which audit key `stockade audit verify` trusts: never just the one beside the log.

Whoever can rewrite the log can also replace the public key next to it and re-sign
everything, so the verifier needs a key it got another way:
- `--key FILE`: a public key exported earlier (`stockade audit key`);
- `--key-fingerprint HEX`: the key beside the log is used only if its SHA-256 fingerprint
  is this one (the daemon logs it at start; `stockade status` shows it);
- or either pinned in the verifier's config, TOML at `$STOCKADE_VERIFY_CONFIG`, else
  `$XDG_CONFIG_HOME/stockade/verify.toml` (~/.config/stockade/verify.toml):
  `key = "/path/stockade-audit.pub"` or `key_fingerprint = "…"`.
With none of these, verify refuses to run (usage error).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stockade import exitcodes
from stockade.audit.chain import (
    AUDIT_KEY_FILE,
    fingerprint,
    load_public_key,
    normal_fingerprint,
    public_path,
)
from stockade.cli.channel import CliError
from stockade.config import load_settings

CONFIG_ENV = "STOCKADE_VERIFY_CONFIG"
VERIFY_CONFIG_HELP = (
    "The key is never taken on trust from beside the log: give --key or --key-fingerprint,\n"
    f"or pin `key = PATH` or `key_fingerprint = HEX` in ${CONFIG_ENV} or\n"
    "$XDG_CONFIG_HOME/stockade/verify.toml (default ~/.config/stockade/verify.toml)."
)


def verifier_config_path() -> Path:
    chosen = os.environ.get(CONFIG_ENV)
    if chosen:
        return Path(chosen)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "stockade" / "verify.toml"


def _verifier_config() -> dict[str, Any]:
    path = verifier_config_path()
    if not path.is_file():
        if os.environ.get(CONFIG_ENV):
            raise CliError(f"{CONFIG_ENV}={path}: no such file", exitcodes.USAGE)
        return {}
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"verifier config {path}: {exc}", exitcodes.USAGE) from None
    unknown = set(config) - {"key", "key_fingerprint"}
    if unknown:
        raise CliError(f"verifier config {path}: unknown key(s) {sorted(unknown)}", 1)
    return config


def _beside(args: argparse.Namespace, files: list[Path]) -> Path:
    """The public key an unpinned verifier would have used: the state dir's."""
    folder = Path(args.dir) if args.dir else files[0].parent
    candidate = public_path(folder.parent / "pki" / AUDIT_KEY_FILE)
    if candidate.exists():
        return candidate
    return public_path(load_settings().state_dir / "pki" / AUDIT_KEY_FILE)


def pinned_key(args: argparse.Namespace, files: list[Path]) -> Ed25519PublicKey | str:
    """The trusted key, or (a str) why the key found is not the pinned one."""
    config = _verifier_config() if not (args.key or args.key_fingerprint) else {}
    key_file = args.key or config.get("key")
    wanted_text = args.key_fingerprint or config.get("key_fingerprint")
    if not key_file and not wanted_text:
        raise CliError(
            "give --key FILE or --key-fingerprint HEX (or pin one in "
            f"{verifier_config_path()}): the key beside the log is not trusted",
            exitcodes.USAGE,
        )
    try:
        wanted = normal_fingerprint(str(wanted_text)) if wanted_text else None
    except ValueError as exc:
        raise CliError(str(exc), exitcodes.USAGE) from None
    path = Path(str(key_file)) if key_file else _beside(args, files)
    try:
        key = load_public_key(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the audit public key: {exc}", exitcodes.USAGE) from None
    if wanted is not None and fingerprint(key) != wanted:
        return (
            f"{path} has fingerprint {fingerprint(key)}, not the pinned {wanted}: "
            "the key was replaced"
        )
    return key


def add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", help="the audit public key (PEM) exported earlier")
    parser.add_argument(
        "--key-fingerprint",
        metavar="HEX",
        help="trust the key beside the log only if its SHA-256 fingerprint is this",
    )
