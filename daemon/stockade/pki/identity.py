"""Identities are certificate SAN URIs: `spiffe://stockade.local/<role>/<name>`.

The role decides what a caller may do before any policy is consulted: `admin` may use the
Control API (and the relay); `host` may use the relay only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from cryptography import x509

TRUST_DOMAIN = "stockade.local"
Role = Literal["admin", "host"]
ROLES: tuple[Role, ...] = ("admin", "host")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class IdentityError(ValueError):
    """A name or certificate does not carry a valid Stockade identity."""


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str

    @property
    def uri(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/{self.role}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if not uri.startswith(prefix):
            raise IdentityError(f"{uri!r} is not in the {TRUST_DOMAIN} trust domain")
        role, _, name = uri[len(prefix) :].partition("/")
        if role not in ROLES or not NAME_PATTERN.match(name):
            raise IdentityError(f"{uri!r} is not spiffe://{TRUST_DOMAIN}/(admin|host)/NAME")
        return cls(role, name)

    @classmethod
    def make(cls, role: str, name: str) -> Identity:
        if role not in ROLES:
            raise IdentityError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not NAME_PATTERN.match(name):
            raise IdentityError(
                f"identity name {name!r} must be 1-63 letters, digits, '.', '_' or '-'"
            )
        return cls(role, name)


@dataclass(frozen=True)
class PeerCertificate:
    identity: Identity
    serial: int


@lru_cache(maxsize=1024)
def peer_from_pem(pem: bytes) -> PeerCertificate:
    """The identity and serial of a peer certificate (cached: one parse per certificate)."""
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subject alternative name") from None
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError("the certificate must carry exactly one identity URI")
    return PeerCertificate(Identity.parse(uris[0]), certificate.serial_number)


def subject_of(pem: bytes) -> str | None:
    """A certificate's subject (RFC 4514), for records of refused callers; None if unreadable."""
    try:
        return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    except ValueError:
        return None
