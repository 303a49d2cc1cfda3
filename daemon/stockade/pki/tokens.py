"""Bearer tokens for the HTTP front, for hosts that cannot present a client certificate.

A token is issued by this daemon, for one identity and one server (its audience), for a
bounded time: `stk1.<payload>.<signature>`, the payload base64url JSON {sub, aud, iat, exp,
jti}, the signature Ed25519 by the daemon's token key. The front accepts a token only for
the server it names: a token is never valid for another server, and it is never passed to
a server (servers speak stdio and see no HTTP headers at all). Revocation is by token id,
or by identity (every token of it issued until then), and survives restarts.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from stockade.audit.chain import fingerprint, load_or_create_key
from stockade.state_seal import RECOVERY, StateSeal, StateTampered

PREFIX = "stk1"
MAX_TTL_SECONDS = 24 * 3600
SEAL_NAME = "pki/revoked-tokens.json"


class TokenError(Exception):
    """A token is refused; the message says why (never the token)."""


@dataclass(frozen=True)
class Token:
    value: str
    identity: str
    audience: str
    expires: int
    token_id: str


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    def __init__(self, pki_dir: Path, seal: StateSeal) -> None:
        try:
            self._key = load_or_create_key(pki_dir / "token-key.pem")
        except ValueError as exc:  # not a key (garbage, another kind)
            raise StateTampered(f"the token key is unusable ({exc}); {RECOVERY}") from None
        self._seal = seal
        # The signing key and the revocations are pinned and sealed (`state_seal.py`): a
        # writer of the state folder can neither mint tokens with its own key nor take a
        # revocation back.
        seal.pin("token key", fingerprint(self._key.public_key()))
        self._revoked_path = pki_dir / "revoked-tokens.json"
        self._revoked_ids: set[str] = set()
        self._revoked_identities: dict[str, int] = {}  # identity -> tokens issued before
        data = seal.load(self._revoked_path, SEAL_NAME)
        try:
            if data is not None:
                self._revoked_ids = {str(i) for i in data["ids"]}
                self._revoked_identities = {
                    str(k): int(v) for k, v in dict(data["identities"]).items()
                }
        except (TypeError, ValueError, KeyError, AttributeError):
            raise StateTampered(f"{self._revoked_path} has the wrong shape; {RECOVERY}") from None

    def issue(self, identity: str, audience: str, ttl_seconds: int) -> Token:
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise TokenError(f"a token lives between 1 s and {MAX_TTL_SECONDS} s")
        now, token_id = int(time.time()), secrets.token_hex(8)
        claims: dict[str, str | int] = {
            "sub": identity,
            "aud": audience,
            "iat": now,
            "exp": now + ttl_seconds,
            "jti": token_id,
        }
        payload = _encode(json.dumps(claims, sort_keys=True).encode())
        signed = f"{PREFIX}.{payload}"
        value = f"{signed}.{_encode(self._key.sign(signed.encode()))}"
        return Token(value, identity, audience, now + ttl_seconds, token_id)

    def verify(self, value: str, audience: str) -> tuple[str, str]:
        """(identity, token id) of a valid token for `audience`; TokenError otherwise."""
        parts = value.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise TokenError("not a Stockade token")
        try:
            self._key.public_key().verify(_decode(parts[2]), f"{parts[0]}.{parts[1]}".encode())
            claims = json.loads(_decode(parts[1]))
        except (InvalidSignature, ValueError):
            raise TokenError("the token's signature does not verify") from None
        if claims.get("aud") != audience:
            raise TokenError(f"the token is for server {claims.get('aud')!r}, not {audience!r}")
        if int(claims.get("exp", 0)) <= time.time():
            raise TokenError("the token has expired")
        if claims.get("jti") in self._revoked_ids:
            raise TokenError(f"token {claims.get('jti')} has been revoked")
        identity = str(claims.get("sub", ""))
        if int(claims.get("iat", 0)) <= self._revoked_identities.get(identity, -1):
            raise TokenError(f"tokens of {identity} have been revoked")
        return identity, str(claims.get("jti", ""))

    def revoke(self, token_id: str | None = None, identity: str | None = None) -> None:
        if token_id:
            self._revoked_ids.add(token_id)
        if identity:
            self._revoked_identities[identity] = int(time.time())
        self._save()

    def _save(self) -> None:
        data = {"ids": sorted(self._revoked_ids), "identities": self._revoked_identities}
        self._seal.save(self._revoked_path, SEAL_NAME, data)
