"""The audit record format: canonical JSON lines chained by SHA-256, Ed25519 checkpoints.

One record per line, canonical JSON (sorted keys, no spaces, UTF-8). Each record carries
`seq` (1, 2, 3, … across files) and `prev`, the SHA-256 (hex) of the previous line's bytes
(GENESIS for the first record ever). A checkpoint record (`type: audit.checkpoint`) also
carries `signature`: Ed25519 over the checkpoint record itself (all its other fields,
`checkpoint_message`), whose `prev` covers every record before it through the chain.
Editing, deleting, inserting or reordering a line breaks the next line's `prev`; removing
lines at the end is caught against the signed head.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stockade.atomic import write_atomically

GENESIS = "0" * 64
CHECKPOINT = "audit.checkpoint"
FILE_PATTERN = "audit-*.jsonl"
HEAD_FILE = "head.json"
AUDIT_KEY_FILE = "audit-key.pem"  # in the state dir's pki folder; the .pub beside it


# One encoder, made once: json.dumps with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(record: dict[str, Any]) -> bytes:
    return _ENCODER.encode(record).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def checkpoint_message(record: dict[str, Any]) -> bytes:
    unsigned = {key: value for key, value in record.items() if key != "signature"}
    return b"stockade-audit-checkpoint:v1:" + canonical(unsigned)


def sign(key: Ed25519PrivateKey, record: dict[str, Any]) -> str:
    return base64.b64encode(key.sign(checkpoint_message(record))).decode()


def file_name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The daemon's audit signing key (0600); its public half is written next to it."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomically(path, pem)
    write_atomically(public_path(path), public_pem(key.public_key()), mode=0o644)
    return key


def public_path(key_path: Path) -> Path:
    return key_path.with_suffix(".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: what a verifier pins."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def normal_fingerprint(text: str) -> str:
    """A fingerprint as typed (any case, colons, a `sha256:` prefix) in its hex form."""
    value = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{text!r} is not a SHA-256 key fingerprint (64 hex digits)")
    return value


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
